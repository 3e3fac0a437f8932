// Shared helpers of the quantdream serve pages (no framework; every value goes through textContent or esc()).
const H = {"X-Quantdream": "1"};
function esc(s) { return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }
async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: {...H, ...(opts.headers || {})}});
  const ct = r.headers.get("content-type") || "";
  const body = ct.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(body && body.error ? body.error : (typeof body === "string" ? body : r.statusText));
  return body;
}
function fmtSeconds(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  if (s < 86400 * 2) return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  return (s / 86400).toFixed(1) + " days";
}
function fmtMiB(m) { return m == null ? "–" : (m >= 1024 ? (m / 1024).toFixed(2) + " GiB" : Math.round(m) + " MiB"); }
function badge(state) { return `<span class="badge ${esc(state)}" data-state="${esc(state)}">${esc(state)}</span>`; }
function fileUrl(id, path) { return `/api/runs/${encodeURIComponent(id)}/files/${path.split("/").map(encodeURIComponent).join("/")}`; }
function nav(active) {
  const links = [["/", "Runs"], ["/new", "New run"], ["/compare", "Compare"]];
  document.querySelector("header nav").innerHTML = links.map(([h, t]) =>
    `<a href="${h}" class="${t === active ? "active" : ""}">${t}</a>`).join("");
}
function lineChart(svg, points, opts = {}) {
  // points: [[x, y], ...] -> a polyline with axes labels, in the svg's own coordinates
  const W = 600, Hh = 220, L = 52, R = 12, T = 12, B = 28;
  svg.setAttribute("viewBox", `0 0 ${W} ${Hh}`);
  if (!points.length) { svg.innerHTML = `<text x="${W / 2}" y="${Hh / 2}" text-anchor="middle" fill="#98a2b3" font-size="13">${esc(opts.empty || "no data yet")}</text>`; return; }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) { x0 -= Math.max(1, Math.abs(x0) * 0.05); x1 += Math.max(1, Math.abs(x1) * 0.05); } if (y1 === y0) { y1 += Math.abs(y0) * 0.1 + 1e-6; y0 -= Math.abs(y0) * 0.1 + 1e-6; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (1 - (y - y0) / (y1 - y0)) * (Hh - T - B);
  const fmt = v => Number.isInteger(v) || Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2);
  let g = `<line x1="${L}" y1="${Hh - B}" x2="${W - R}" y2="${Hh - B}" stroke="#d0d5dd"/><line x1="${L}" y1="${T}" x2="${L}" y2="${Hh - B}" stroke="#d0d5dd"/>`;
  g += `<text x="${L - 6}" y="${T + 4}" text-anchor="end" font-size="11" fill="#667085">${fmt(y1)}</text>`;
  g += `<text x="${L - 6}" y="${Hh - B}" text-anchor="end" font-size="11" fill="#667085">${fmt(y0)}</text>`;
  g += `<text x="${L}" y="${Hh - 8}" font-size="11" fill="#667085">${fmt(x0)}</text>`;
  g += `<text x="${W - R}" y="${Hh - 8}" text-anchor="end" font-size="11" fill="#667085">${fmt(x1)} ${esc(opts.xlabel || "")}</text>`;
  if (opts.scatter) {
    g += points.map(p => `<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="5" fill="#2f6fed"/><text x="${sx(p[0]) + 8}" y="${sy(p[1]) + 4}" font-size="11" fill="#344054">${esc(p[2] || "")}</text>`).join("");
  } else {
    g += `<polyline fill="none" stroke="#2f6fed" stroke-width="1.6" points="${points.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ")}"/>`;
  }
  svg.innerHTML = g;
}
