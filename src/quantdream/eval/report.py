"""The comparison report of ``quantdream compare``: ZOODiP's Table 1 columns per method, the
memory-versus-fidelity scatter of its Figure 1, and sample grids, built from what the other steps wrote.

    rows = method_rows(runs, evaluation, memory)       # run.json per method, metrics.json, memory.json
    report = build_report(rows, subject=..., settings=..., evaluation=evaluation, memory=memory)
    figure1(rows, "OUT/figure1.png")                   # x: training memory (log), y: CLIP-I
    Path("OUT/report.md").write_text(report_markdown(report))

Inputs are the plain dicts the other commands write: ``run.json`` (quantdream personalize), the result of
``eval.protocol.evaluate_runs`` (metrics.json) and of ``bench.memory.bench_memory`` (memory.json). A row is
one flat dict per method (see :data:`ROW_KEYS`), so several subjects average with :func:`mean_rows`
(benchmarks/comparison.py). Only :func:`figure1` and :func:`prompt_grids` write files.

Training memory ("train memory") is the memory bench's training peak of the method on a random-weight
architecture, each method in a fresh subprocess: CUDA max allocated on a GPU, the process VmHWM over the
training steps on CPU. The in-run peak (from run.json) is measured inside the compare process, after the
methods before it ran there, so it is reported but not plotted when the bench ran.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from ..bench.memory import human_bytes
from .protocol import METRIC_COLUMNS

MIB = 1024 * 1024

# ZOODiP Table 1: the base recipe of each method and whether it needs gradients (methods.md 1.11)
FAMILY = {"dreambooth": "DB", "lora": "DB", "qlora": "DB", "peqa": "DB", "tuneqdm": "DB", "tuneqdm-s1": "DB",
          "tuneqdm-s2": "DB", "ti": "TI", "gf-ti": "TI", "zoodip": "TI", "zoodip-fast": "TI"}
GRADIENT_FREE = ("zoodip", "zoodip-fast", "gf-ti")

# ZOODiP Table 1 (SD1.5, DreamBooth dataset): Mem (GB), Storage (MB), CLIP-T, CLIP-I, DINO. QLoRA is r=2;
# LoRA has no row of its own and the TuneQDM variants are the paper's one "TuneQDM" row.
PAPER_TABLE1 = {
    "dreambooth": (19.4, 3438, 0.281, 0.782, 0.592), "qlora": (7.56, 1.63, 0.297, 0.762, 0.607),
    "peqa": (6.31, 1.32, 0.275, 0.791, 0.604), "tuneqdm": (8.96, 2.48, 0.289, 0.788, 0.555),
    "ti": (6.75, 0.003, 0.285, 0.778, 0.559), "gf-ti": (2.37, 0.003, 0.253, 0.540, 0.011),
    "zoodip": (2.37, 0.003, 0.287, 0.772, 0.558),
}

METRIC_KEYS = [k for k, _ in METRIC_COLUMNS]
# the number columns of a row (averaged by mean_rows); metrics are the METRIC_KEYS
NUMBER_KEYS = ["steps", "unet_forward_passes", "seconds", "storage_bytes", "run_peak_mib", "memory_mib",
               "memory_whole_process_mib", "memory_storage_bytes", "memory_seconds_per_step"] + METRIC_KEYS
ROW_KEYS = ["method", "status", "note", "family", "gradient_free", "weights", "run_dir", "grid",
            "memory_arch", "memory_source", "memory_status", "memory_note"] + NUMBER_KEYS
# subject fidelity on the y axis of Figure 1, first one present
FIDELITY_KEYS = ("clip_i", "world_clip_i", "effnet")
# (key, header) of the Table-1 table; the real CLIP/DINO columns appear only when a run has them
TABLE_COLUMNS = [("weights", "quant"), ("gradient_free", "grad-free"), ("memory_mib", "train memory (MiB)"),
                 ("memory_storage_bytes", "bench storage"), ("run_peak_mib", "in-run peak (MiB)"),
                 ("storage_bytes", "storage"),
                 ("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino", "DINO"),
                 ("world_clip_t", "world CLIP-T"), ("world_clip_i", "world CLIP-I"),
                 ("subject_attr_acc", "subject attr. acc."),
                 ("effnet", "DINO stand-in (EffNet-Lite0)"), ("prompt_accuracy", "prompt acc."),
                 ("steps", "steps"), ("unet_forward_passes", "UNet passes"), ("seconds", "time (s)")]
OPTIONAL_COLUMNS = ("clip_t", "clip_i", "dino", "memory_storage_bytes", "subject_attr_acc")
# columns added after results were committed: a row evaluated before them shows "-"
LATER_COLUMNS = ("subject_attr_acc",)


# ----------------------------------------------------------------------------- rows
def run_peak_mib(summary: dict) -> float | None:
    """The training peak a run recorded (run.json ``peak_memory_training``): CUDA max allocated, else VmHWM."""
    p = summary.get("peak_memory_training") or {}
    if p.get("cuda_max_allocated_mib") is not None:
        return float(p["cuda_max_allocated_mib"])
    if p.get("cuda_max_allocated_bytes") is not None:
        return p["cuda_max_allocated_bytes"] / MIB
    return float(p["vmhwm_mib"]) if p.get("vmhwm_mib") is not None else None


def bench_memory_mib(row: dict) -> tuple[float | None, str]:
    """(training memory in MiB, what it is) of one ``bench memory`` row; (None, why) when not measured."""
    if row.get("status") != "ok":
        return None, row.get("note") or row.get("status", "not measured")
    tp = row.get("training_peak") or {}
    if tp.get("cuda_max_allocated_mib") is not None:
        return float(tp["cuda_max_allocated_mib"]), f"bench {row['arch']} CUDA max allocated"
    if tp.get("vmhwm_mib") is not None:
        return float(tp["vmhwm_mib"]), f"bench {row['arch']} training VmHWM"
    return None, "no training peak in the bench row"


def empty_row(method: str) -> dict:
    return {**{k: None for k in ROW_KEYS}, "method": method, "family": FAMILY.get(method),
            "gradient_free": method in GRADIENT_FREE}


def method_rows(runs: dict[str, dict], evaluation: dict | None = None, memory: dict | None = None,
                eval_prefix: str = "eval") -> list[dict]:
    """One row per method, in the order of ``runs``.

    runs: {method: run.json contents} for finished runs, or {method: {"status": "failed", "note": why,
    "run_dir": ...}} for runs that did not finish. evaluation: ``evaluate_runs``'s result (rows matched by
    run folder; grids become ``eval_prefix/grids/...``). memory: ``bench_memory``'s result."""
    by_dir = {}
    for r in (evaluation or {}).get("rows", []):
        if r.get("run_dir"):
            by_dir[Path(r["run_dir"]).resolve()] = r
    rows = []
    for method, s in runs.items():
        row = empty_row(method)
        row["run_dir"] = s.get("run_dir")
        if s.get("status") in ("failed", "interrupted", "not run"):
            row.update(status=s["status"], note=s.get("note"))
            rows.append(row)
            continue
        row.update(status="ok", weights=s.get("weights"), steps=s.get("steps"),
                   unet_forward_passes=s.get("unet_forward_passes"), seconds=s.get("seconds"),
                   storage_bytes=s.get("output_bytes"), run_peak_mib=run_peak_mib(s))
        ev = by_dir.get(Path(s["run_dir"]).resolve()) if s.get("run_dir") else None
        if ev is not None:
            row.update({k: v for k, v in ev["metrics"].items() if k in METRIC_KEYS})
            row["grid"] = f"{eval_prefix}/{ev['grid']}"
        elif evaluation is not None:
            row["note"] = "not evaluated"
        rows.append(row)
    return add_memory(rows, memory) if memory else rows


def add_memory(rows: list[dict], memory: dict) -> list[dict]:
    """Copy each method's ``bench memory`` numbers into its row (a new list of new rows)."""
    bench = {r["method"]: r for r in memory.get("rows", [])}
    out = []
    for row in rows:
        row = dict(row)
        b = bench.get(row["method"])
        if b is None:
            row.update(memory_status="not measured")
        else:
            mib, source = bench_memory_mib(b)
            row.update(memory_arch=b.get("arch"), memory_status=b.get("status"), memory_mib=mib,
                       memory_source=source if mib is not None else None,
                       memory_note=None if mib is not None else source,
                       memory_whole_process_mib=b.get("whole_process_peak_mib"),
                       memory_storage_bytes=b.get("storage_bytes"),
                       memory_seconds_per_step=b.get("seconds_per_step"))
        out.append(row)
    return out


def _mean(xs: Iterable) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def mean_rows(tables: list[list[dict]]) -> list[dict]:
    """The mean over subjects of every number column, per method (first-seen order). ``subjects`` counts
    the rows with status ok; text columns come from the first such row."""
    groups: dict[str, list[dict]] = {}
    for table in tables:
        for row in table:
            groups.setdefault(row["method"], []).append(row)
    out = []
    for method, rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        first = dict(ok[0] if ok else rs[0])
        first.update({k: _mean(r.get(k) for r in ok) for k in NUMBER_KEYS})
        first.update(subjects=len(ok), grid=None, run_dir=None,
                     status="ok" if ok else rs[0].get("status"),
                     note=None if len(ok) == len(rs) else f"{len(rs) - len(ok)} of {len(rs)} runs did not finish")
        out.append(first)
    return out


def fidelity_key(rows: list[dict]) -> str | None:
    """The subject-fidelity column Figure 1 plots: real CLIP-I, else world CLIP-I, else EffNet-Lite0."""
    for k in FIDELITY_KEYS:
        if any(r.get(k) is not None for r in rows):
            return k
    return None


def memory_key(rows: list[dict]) -> str | None:
    """The memory column Figure 1 plots: the bench's training memory if any row has it, else the in-run peak."""
    for k in ("memory_mib", "run_peak_mib"):
        if any(r.get(k) is not None for r in rows):
            return k
    return None


def ratios_to(rows: list[dict], key: str, reference: str) -> dict[str, float]:
    """{method: row[key] / reference's row[key]} (e.g. memory relative to zoodip); {} if it has none."""
    ref = next((r.get(key) for r in rows if r["method"] == reference), None)
    if not ref:
        return {}
    return {r["method"]: r[key] / ref for r in rows if r.get(key) is not None}


# ----------------------------------------------------------------------------- files
HEADERS = {"clip_i": "CLIP-I", "world_clip_i": "world CLIP-I", "effnet": "EffNet-Lite0 similarity (DINO stand-in)",
           "memory_mib": "training memory (MiB, log scale)", "run_peak_mib": "in-run training peak (MiB, log scale)"}


def _labels(ax, rows: list[dict], x: str, y: str) -> None:
    """One label per point; a label that would sit on an earlier one (close in log-x and y) moves down a line."""
    import math
    if not rows:
        return
    lx = [math.log10(r[x]) for r in rows]
    ys = [r[y] for r in rows]
    wx, wy = (max(lx) - min(lx)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for i in sorted(range(len(rows)), key=lambda i: -ys[i]):
        k = 0
        while any(abs(lx[i] - px) < 0.15 * wx and abs(ys[i] - 0.05 * wy * k - py) < 0.045 * wy for px, py in placed):
            k += 1
        placed.append((lx[i], ys[i] - 0.05 * wy * k))
        ax.annotate(rows[i]["method"], (rows[i][x], ys[i]), textcoords="offset points", xytext=(6, 5 - 11 * k),
                    fontsize=9)


def figure1(rows: list[dict], path: str | Path, title: str = "") -> dict:
    """ZOODiP Figure 1: training memory (x, log scale) against subject fidelity (y), one labelled point per
    method; gradient-free methods are stars. Always writes the PNG (with a note when nothing can be
    plotted). Returns {"x": key, "y": key, "plotted": [...], "left_out": {method: why}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write
    x, y = memory_key(rows), fidelity_key(rows)
    plotted, left_out = [], {}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for r in rows:
        if r.get("status") != "ok":
            left_out[r["method"]] = r.get("status") or "no run"
        elif x is None or r.get(x) is None:
            left_out[r["method"]] = "no memory measurement" + (f" ({r['memory_note']})" if r.get("memory_note") else "")
        elif y is None or r.get(y) is None:
            left_out[r["method"]] = "no subject-fidelity metric"
        else:
            plotted.append(r["method"])
            star = r["method"] in GRADIENT_FREE
            colour = "tab:red" if r["method"] == "zoodip" else ("tab:blue" if r.get("family") == "DB" else "tab:green")
            ax.scatter([r[x]], [r[y]], s=140 if star else 60, marker="*" if star else "o", color=colour, zorder=3)
    _labels(ax, [r for r in rows if r["method"] in plotted], x, y)
    if plotted:
        ax.set_xscale("log")
        ax.set_xlabel(HEADERS.get(x, x))
        ax.set_ylabel(HEADERS.get(y, y))
        ax.grid(True, which="both", alpha=0.3)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "nothing to plot: " + ("no memory measurement" if x is None else
                                                 "no subject-fidelity metric" if y is None else "no finished run"),
                ha="center", va="center", transform=ax.transAxes)
    if left_out:
        fig.text(0.01, 0.01, "not shown: " + ", ".join(f"{m} ({why})" for m, why in left_out.items())[:160],
                 fontsize=7, color="0.4")
    ax.set_title(title or "Training memory vs subject fidelity (ZOODiP Fig. 1)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return {"x": x, "y": y, "plotted": plotted, "left_out": left_out}


def prompt_grids(evaluation: dict, eval_dir: str | Path, out_dir: str | Path, prefix: str = "grids") -> list[dict]:
    """One comparison grid per prompt (rows: methods, columns: the images of that prompt), cut from the
    per-run grids ``evaluate`` wrote (rows: prompts; ``models.sample.make_grid`` layout, 2 px padding).
    Returns [{"prompt", "kind", "file" (``prefix/...``), "rows": [run names]}]; [] if the grids disagree."""
    from PIL import Image, ImageDraw

    from ..checkpoint import atomic_write
    from ..models.sample import slug
    pad = 2
    rows = [r for r in evaluation.get("rows", []) if (Path(eval_dir) / r["grid"]).is_file()]
    if not rows:
        return []
    n, per = len(rows[0]["prompts"]), rows[0]["images_per_prompt"]
    if any(len(r["prompts"]) != n or r["images_per_prompt"] != per for r in rows):
        return []
    strips: list[list[Image.Image]] = []
    for r in rows:
        with Image.open(Path(eval_dir) / r["grid"]) as im:
            im = im.convert("RGB")
        h, w = (im.height - pad) // n - pad, (im.width - pad) // per - pad
        if (h + pad) * n + pad != im.height or (w + pad) * per + pad != im.width:
            return []
        strips.append([im.crop((0, pad + i * (h + pad), im.width, pad + i * (h + pad) + h)) for i in range(n)])
    out = []
    template = rows[0].get("clip_t_texts") or rows[0]["prompts"]
    label_w = 6 * max(len(r["name"]) for r in rows) + 8          # the default bitmap font: ~6 px a character
    for i in range(n):
        width, height = strips[0][i].width, strips[0][i].height
        grid = Image.new("RGB", (label_w + width, len(rows) * (height + pad) + pad), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for j, s in enumerate(strips):
            grid.paste(s[i], (label_w, pad + j * (height + pad)))
            draw.text((4, pad + j * (height + pad) + height // 2 - 5), rows[j]["name"], fill=(0, 0, 0))
        name = f"prompt_{i:02d}_{slug(template[i], 50)}.png"
        atomic_write(Path(out_dir) / name, lambda tmp, g=grid: g.save(tmp, format="PNG"))
        kinds = rows[0].get("kinds") or [None] * n
        out.append({"prompt": template[i], "kind": kinds[i], "file": f"{prefix}/{name}",
                    "rows": [r["name"] for r in rows]})
    return out


# ----------------------------------------------------------------------------- the report
def build_report(rows: list[dict], *, subject: dict, settings: dict, evaluation: dict | None = None,
                 memory: dict | None = None, figure: dict | None = None,
                 grids: list[dict] | None = None, notes: list[str] | None = None) -> dict:
    """What report.json holds: the rows, the memory ratios to ZOODiP, the paper's numbers beside them,
    the sample grids and every note of the evaluation and the bench."""
    mkey = memory_key(rows)
    out_notes = list(notes or [])
    if mkey == "memory_mib":
        arch = next((r["memory_arch"] for r in rows if r.get("memory_arch")), "?")
        out_notes.append(f"train memory: the memory bench on the {arch} architecture with random weights, each method "
                         f"in a fresh subprocess (CUDA max allocated on a GPU, training VmHWM on CPU); bench "
                         f"storage: the output files of that bench run (the paper's storage column)")
    out_notes.append("in-run peak: measured inside the compare process while training (after earlier methods "
                     "ran in the same process); storage: the run's output files; time: the training loop only")
    if evaluation:
        out_notes += [n for n in evaluation.get("notes", []) if n not in out_notes]
    else:
        out_notes.append("no evaluation: every metric column is empty")
    return {
        "subject": {k: subject.get(k) for k in ("name", "dir", "class_word")},
        "settings": settings,
        "columns": [k for k, _ in TABLE_COLUMNS],
        "rows": rows,
        "memory_ratio_to_zoodip": ratios_to(rows, mkey, "zoodip") if mkey else {},
        "memory_key": mkey,
        "fidelity_key": fidelity_key(rows),
        "figure": figure,
        "method_grids": {r["method"]: r["grid"] for r in rows if r.get("grid")},
        "prompt_grids": grids or [],
        "memory_summary": (memory or {}).get("summary"),
        "paper_table1": {m: dict(zip(("memory_gb", "storage_mb", "clip_t", "clip_i", "dino"), v))
                         for m, v in PAPER_TABLE1.items()},
        "notes": out_notes,
    }


def cell(key: str, value: Any) -> str:
    """One table cell, formatted for its column."""
    if value is None:
        return "-" if key in LATER_COLUMNS else ""
    if key == "gradient_free":
        return "yes" if value else "no"
    if key in ("storage_bytes", "memory_storage_bytes"):
        return human_bytes(value)
    if key in ("memory_mib", "run_peak_mib", "memory_whole_process_mib"):
        return f"{value:.0f}"
    if key in ("steps", "unet_forward_passes"):
        return f"{value:.0f}" if isinstance(value, (int, float)) else str(value)
    if key == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table_markdown(rows: list[dict], first: str = "method") -> list[str]:
    """The Table-1 table: one line per method (failed methods say why)."""
    cols = [(k, h) for k, h in TABLE_COLUMNS if k not in OPTIONAL_COLUMNS or any(r.get(k) is not None for r in rows)]
    if any(r.get("subjects") is not None for r in rows):
        cols = [("subjects", "subjects")] + cols
    lines = [f"| {first} | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        name = r["method"] if r.get("status") == "ok" else f"{r['method']} ({r.get('status')}: {r.get('note') or ''})"
        lines.append(f"| {name} | " + " | ".join(cell(k, r.get(k)) for k, _ in cols) + " |")
    return lines


def _setting(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def report_markdown(report: dict) -> str:
    """report.md: the Table-1 table, Figure 1, the memory ratios, the sample grids, the paper's numbers."""
    rows, s, subj = report["rows"], report["settings"], report["subject"]
    lines = [f"# Method comparison: {subj.get('name')} ({subj.get('class_word')})", ""]
    lines.append("Settings: " + "; ".join(f"{k.replace('_', ' ')} {_setting(v)}" for k, v in s.items()
                                         if v not in (None, "", [], {})) + ".")
    lines += ["", "## Table 1 (columns of ZOODiP Table 1)", ""]
    lines += table_markdown(rows)
    ratios = report.get("memory_ratio_to_zoodip")
    if ratios:
        lines += ["", "Memory relative to ZOODiP: " + ", ".join(f"{m} {v:.2f}x" for m, v in ratios.items()) + "."]
    fig = report.get("figure")
    if fig:
        lines += ["", "## Figure 1: training memory vs subject fidelity", "",
                  f"![training memory vs {fig.get('y')}](figure1.png)", ""]
        lines.append(f"x: {HEADERS.get(fig.get('x'), fig.get('x'))}; y: {HEADERS.get(fig.get('y'), fig.get('y'))}; "
                     "stars: gradient-free methods." +
                     (" Not shown: " + ", ".join(f"{m} ({w})" for m, w in fig["left_out"].items()) + "."
                      if fig.get("left_out") else ""))
        lines.append("")
    if report.get("method_grids") or report.get("prompt_grids"):
        lines += ["## Samples", ""]
    if report.get("method_grids"):
        lines += ["Per method (rows: prompts, in the order below; columns: seeds):", "",
                  "| method | grid |", "|---|---|"]
        lines += [f"| {m} | [{Path(g).name}]({g}) |" for m, g in report["method_grids"].items()]
        lines.append("")
    if report.get("prompt_grids"):
        order = ", ".join(report["prompt_grids"][0]["rows"])
        lines += [f"Per prompt (rows: {order}; prompts shown with the class word in place of the subject):", ""]
        for g in report["prompt_grids"]:
            lines += [f"**{g['prompt']}** ({g['kind']})", "", f"![{g['prompt']}]({g['file']})", ""]
    if lines[-1]:
        lines.append("")
    lines += ["## ZOODiP Table 1 (paper, SD1.5, for reference)", "",
              "| method | Mem (GB) | Storage (MB) | CLIP-T | CLIP-I | DINO |", "|---|---|---|---|---|---|"]
    for m, v in report["paper_table1"].items():
        lines.append(f"| {m} | {v['memory_gb']} | {v['storage_mb']} | {v['clip_t']} | {v['clip_i']} | {v['dino']} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


__all__ = ["FAMILY", "GRADIENT_FREE", "PAPER_TABLE1", "ROW_KEYS", "TABLE_COLUMNS", "add_memory", "bench_memory_mib",
           "build_report", "figure1", "fidelity_key", "mean_rows", "memory_key", "method_rows", "prompt_grids",
           "ratios_to", "report_markdown", "run_peak_mib", "table_markdown"]
