"""The FastAPI app of `quantdream serve`: four pages (plain HTML + JS in static/), a JSON API, server-sent events.

    GET  /  /new  /runs/{id}  /compare           pages
    GET  /api/options                            models, methods, bit widths, example subjects, limits
    GET  /api/plan?method=&model=&steps=         time plan and memory estimate
    POST /api/runs                               new run (multipart: photos or an example subject + settings)
    GET  /api/runs  /api/runs/{id}               list, one run (state, progress, samples, downloads, log tail)
    GET  /api/events  /api/runs/{id}/events      the same, as server-sent events while anything changes
    POST /api/runs/{id}/stop | resume            SIGINT (checkpoint kept) | continue from the checkpoint
    POST /api/runs/{id}/generate                 prompts with the learned token -> images (a generate job)
    POST /api/runs/{id}/evaluate                 subject and prompt fidelity (an evaluate job; compare shows it)
    GET  /api/runs/{id}/files/{path}             a file of the run (samples, downloads, photos, generated images)
    GET  /api/runs/{id}/log                      the whole log
    DELETE /api/runs/{id}
    GET  /api/compare?ids=a,b                    finished runs side by side

Safety: with a token (required off loopback) every request must carry it (?token= once, then a cookie; or an
``Authorization: Bearer`` header); without one, only loopback Host headers are answered (no DNS rebinding).
Requests that change anything must carry ``X-Quantdream: 1`` (a page of another site cannot add it).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import shutil
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

from ..methods import METHODS
from . import plan
from .jobs import Queue, last_lines
from .store import TOKEN_METHODS, RequestError, ServeConfig, Store, inside, read_json, slug

STATIC = Path(__file__).parent / "static"
WEIGHTS = ("auto", "int8", "int4", "none", "nf4")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COOKIE = "quantdream_token"
WORD = re.compile(r"^[A-Za-z][A-Za-z'-]{0,29}$")
TOKEN = re.compile(r"^[<A-Za-z0-9][\w<>.-]{0,39}$")
DOWNLOADS = ("learned_embeds.safetensors", "learned_embeds.pt", "pytorch_lora_weights.safetensors",
             "scales.safetensors", "adapter.json", "run.json", "config.toml", "losses.json", "loss.png")
LIMITS = {"steps": (0, 1_000_000), "seed": (0, 2**31 - 1), "sample_every": (0, 1_000_000),
          "checkpoint_every": (0, 1_000_000), "sample_images": (0, 8), "sample_steps": (1, 200),
          "num_images": (1, 8), "gen_steps": (0, 200)}


def check_models(models: dict) -> dict:
    """name -> {"path", "kind", "error"} for "embedded" and each --model NAME=PATH (checked, never loaded)."""
    out = {"embedded": {"path": "tiny", "kind": "embedded", "error": None}}
    for name, path in models.items():
        p = Path(path).expanduser()
        error = None
        if not p.exists():
            error = f"model folder {str(p)!r} does not exist"
        elif p.is_dir() and not ((p / "model_index.json").is_file() or (p / "quantdream.json").is_file()):
            error = f"{str(p)!r} is not a Stable Diffusion diffusers folder (no model_index.json) nor a quantized folder"
        elif p.is_file() and p.suffix not in (".safetensors", ".ckpt"):
            error = f"{str(p)!r} is not a Stable Diffusion checkpoint (.safetensors or .ckpt expected)"
        out[name] = {"path": str(p.resolve()), "kind": "sd", "error": error}
    return out


def number(form, name: str, default: int) -> int:
    raw = form.get(name)
    if raw in (None, ""):
        return default
    try:
        v = int(str(raw))
    except ValueError:
        raise RequestError(f"{name.replace('_', ' ')} must be a whole number, got {str(raw)[:20]!r}") from None
    lo, hi = LIMITS[name]
    if not lo <= v <= hi:
        raise RequestError(f"{name.replace('_', ' ')} must be between {lo} and {hi}, got {v}")
    return v


def create_app(cfg: ServeConfig, start_queue: bool = True) -> FastAPI:
    store = Store(cfg)
    queue = Queue(store)
    models = check_models(cfg.models)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_queue:
            queue.start()
        yield
        queue.close()

    app = FastAPI(title="quantdream serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store, app.state.queue, app.state.models = store, queue, models

    # ------------------------------------------------------------------ safety on every request
    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.url.hostname or ""
        if cfg.token:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), cfg.token.encode()):
                return PlainTextResponse("missing or wrong token: open the address printed by `quantdream serve` "
                                         "(it ends in ?token=...)", 401)
        elif host not in LOOPBACK:
            return PlainTextResponse(f"refused: this server answers only 127.0.0.1/localhost, not {host!r}", 403)
        if request.method not in ("GET", "HEAD") and request.headers.get("x-quantdream") != "1":
            return PlainTextResponse("refused: requests that change something need the X-Quantdream: 1 header", 403)
        response = await call_next(request)
        if cfg.token and request.query_params.get("token"):
            response.set_cookie(COOKIE, cfg.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    # ------------------------------------------------------------------ pages
    def page(name: str):
        return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/")
    async def runs_page():
        return page("runs.html")

    @app.get("/new")
    async def new_page():
        return page("new.html")

    @app.get("/runs/{run_id}")
    async def run_page(run_id: str):
        store.get(run_id)
        return page("run.html")

    @app.get("/compare")
    async def compare_page():
        return page("compare.html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in {p.name for p in STATIC.iterdir()}:
            raise RequestError(f"no file {name!r}", 404)
        return FileResponse(STATIC / name)

    # ------------------------------------------------------------------ the API
    @app.get("/api/options")
    async def options():
        return {"models": [{"name": k, **{kk: v[kk] for kk in ("kind", "error")}} for k, v in models.items()],
                "methods": list(METHODS), "token_methods": list(TOKEN_METHODS), "weights": list(WEIGHTS),
                "examples": store.example_subjects(), "default_steps": plan.default_steps(),
                "limits": {"min_photos": cfg.min_photos, "max_photos": cfg.max_photos,
                           "max_upload_mib": cfg.max_upload_mib, "max_jobs": cfg.max_jobs}}

    def model_of(name: str) -> dict:
        if name not in models:
            raise RequestError(f"unknown model {name!r}: choose one of {', '.join(models)}")
        if models[name]["error"]:
            raise RequestError(f"model {name!r} cannot be used: {models[name]['error']}")
        return models[name]

    def history(model_name: str) -> list[dict]:
        out = []
        for r in store.all():
            if r["state"] == "done" and r["params"]["model"] == model_name:
                s = read_json(store.run_dir(r["id"]) / "out" / "run.json")
                if isinstance(s, dict):
                    out.append(s)
        return out

    @app.get("/api/plan")
    async def plan_endpoint(method: str = "zoodip", model: str = "embedded", steps: int = 0):
        if method not in METHODS:
            raise RequestError(f"unknown method {method!r}")
        m = model_of(model)
        if not 0 <= steps <= LIMITS["steps"][1]:
            raise RequestError(f"steps must be between 0 and {LIMITS['steps'][1]}")
        return plan.estimate(method, m["kind"], steps, history(model))

    @app.post("/api/runs")
    async def create_run(request: Request):
        form = await request.form(max_files=cfg.max_photos + 1, max_part_size=int(cfg.max_upload_mib * 2**20) + 1)
        method = str(form.get("method") or "zoodip")
        if method not in METHODS:
            raise RequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        weights = str(form.get("weights") or "auto")
        if weights not in WEIGHTS:
            raise RequestError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        model_name = str(form.get("model") or "embedded")
        model = model_of(model_name)
        subject = str(form.get("subject") or "upload")
        examples = {e["name"]: e for e in store.example_subjects()}
        init_word = str(form.get("init_word") or (examples[subject]["class_word"] if subject in examples else ""))
        if not WORD.match(init_word):
            raise RequestError("class word: one word of letters, e.g. bag (it starts the new token)")
        name = str(form.get("name") or (subject if subject != "upload" else init_word))[:60]
        token = str(form.get("token") or "")
        if method in TOKEN_METHODS:
            token = token or f"<{slug(name, 'subject')}>"
        if token and not TOKEN.match(token):
            raise RequestError(f"token {token[:40]!r}: letters, digits, <>-_. only, e.g. <my-bag>")
        params = {"method": method, "weights": weights, "model": model_name, "token": token, "init_word": init_word,
                  "subject": subject, "steps": number(form, "steps", 0), "seed": number(form, "seed", 0),
                  "sample_every": number(form, "sample_every", 100),
                  "checkpoint_every": number(form, "checkpoint_every", 100),
                  "sample_images": number(form, "sample_images", 2), "sample_steps": number(form, "sample_steps", 25)}
        uploads = [f for f in form.getlist("photos") if hasattr(f, "read") and getattr(f, "filename", "")]
        if subject == "upload" and not uploads:
            raise RequestError(f"add {cfg.min_photos}-{cfg.max_photos} photos of the subject or pick an example")
        if subject != "upload" and subject not in examples:
            raise RequestError(f"no example subject {subject!r}")
        files = [(f.filename, await f.read()) for f in uploads]
        run_id = store.new_id(name)
        try:
            photos = store.save_uploads(run_id, files) if subject == "upload" else store.copy_example(run_id, subject)
        except RequestError:
            shutil.rmtree(store.run_dir(run_id), ignore_errors=True)
            raise
        rec = {"id": run_id, "name": name, "created": time.time(), "params": params,
               "model_path": model["path"], "photos": photos, "state": "queued", "error": None}
        queue.submit(rec)
        return JSONResponse(view(rec), status_code=201)

    def view(rec: dict, detail: bool = False) -> dict:
        out = {k: v for k, v in rec.items() if k not in ("model_path", "pid", "generations", "evaluation")}
        out["progress"] = queue.progress(rec)
        if not detail:
            out["progress"].pop("curve", None)
            out["progress"].pop("run", None)
            return out
        d = store.run_dir(rec["id"])
        out["downloads"] = [n for n in DOWNLOADS if (d / "out" / n).is_file()]
        if (d / "out" / "unet").is_dir():
            out["downloads"] += [str(p.relative_to(d / "out")) for p in sorted((d / "out" / "unet").rglob("*"))
                                 if p.is_file()]
        out["log_tail"] = last_lines(d / "log.txt")
        out["evaluable"] = (d / "photos" / "subject.json").is_file()
        if rec.get("evaluation"):
            ev = rec["evaluation"]
            out["evaluation"] = {**{k: v for k, v in ev.items() if k != "pid"},
                                 "log_tail": last_lines(d / "eval" / "log.txt", 8) if ev["state"] == "failed" else ""}
        out["generations"] = [{**{k: v for k, v in g.items() if k != "pid"},
                               "log_tail": last_lines(d / "generations" / g["id"] / "log.txt", 8)
                               if g["state"] == "failed" else ""} for g in rec["generations"]]
        return out

    @app.get("/api/runs")
    async def list_runs():
        return {"runs": [view(r) for r in store.all()], "running": [k[0] for k in queue.running()]}

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: str):
        return view(store.get(run_id), detail=True)

    async def stream(request: Request, snapshot):
        last = None
        while not await request.is_disconnected():
            data = json.dumps(snapshot())
            if data != last:
                yield f"data: {data}\n\n"
                last = data
            else:
                yield ": keep-alive\n\n"
            await asyncio.sleep(1.0)

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: str, request: Request):
        store.get(run_id)
        return StreamingResponse(stream(request, lambda: view(store.get(run_id), detail=True)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/api/events")
    async def list_events(request: Request):
        return StreamingResponse(stream(request, lambda: {"runs": [view(r) for r in store.all()]}),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.post("/api/runs/{run_id}/stop")
    async def stop(run_id: str):
        queue.stop(run_id)
        return view(store.get(run_id))

    @app.post("/api/runs/{run_id}/resume")
    async def resume(run_id: str):
        queue.resume(run_id)
        return view(store.get(run_id))

    @app.delete("/api/runs/{run_id}")
    async def delete(run_id: str):
        store.delete(run_id)
        return {"deleted": run_id}

    @app.post("/api/runs/{run_id}/generate")
    async def generate(run_id: str, request: Request):
        rec = store.get(run_id)
        if rec["state"] != "done":
            raise RequestError("generate needs a finished run", 409)
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("send JSON: {\"prompts\": [...], \"seed\": 0, \"num_images\": 4}") from None
        if not isinstance(body, dict):
            raise RequestError("send a JSON object")
        prompts = [str(p).strip() for p in body.get("prompts") or [] if str(p).strip()]
        if not 1 <= len(prompts) <= 8 or any(len(p) > 300 for p in prompts):
            raise RequestError("give 1-8 prompts of at most 300 characters (use {} for the learned subject)")
        if any(p.startswith("-") for p in prompts):
            raise RequestError("a prompt cannot start with '-'")
        gen = {"id": f"{len(rec['generations']) + 1:03d}", "prompts": prompts,
               "seed": number(body, "seed", 0), "num_images": number(body, "num_images", 4),
               "steps": number({"gen_steps": body.get("steps")}, "gen_steps", 0)}
        queue.submit_generation(rec, gen)
        return JSONResponse(gen, status_code=201)

    @app.post("/api/runs/{run_id}/evaluate")
    async def evaluate(run_id: str):
        rec = store.get(run_id)
        if rec["state"] != "done":
            raise RequestError("evaluate needs a finished run", 409)
        if not (store.run_dir(run_id) / "photos" / "subject.json").is_file():
            raise RequestError("evaluate needs the subject's description (subject.json): runs on an example subject "
                               "have one, uploaded photos do not", 409)
        return JSONResponse(queue.submit_evaluation(rec), status_code=201)

    @app.get("/api/runs/{run_id}/files/{path:path}")
    async def files(run_id: str, path: str, download: int = 0):
        p = inside(store.run_dir(run_id), *Path(path).parts) if path else None
        if p is None or not p.is_file():
            raise RequestError(f"no file {path!r} in run {run_id}", 404)
        return FileResponse(p, filename=p.name if download else None,
                            content_disposition_type="attachment" if download else "inline")

    @app.get("/api/runs/{run_id}/log")
    async def log(run_id: str):
        p = store.run_dir(store.get(run_id)["id"]) / "log.txt"
        text = p.read_text(errors="replace") if p.is_file() else ""
        return PlainTextResponse("\n".join(seg.split("\r")[-1] for seg in text.split("\n")))

    @app.get("/api/compare")
    async def compare(ids: str = ""):
        rows = []
        for rid in [i for i in ids.split(",") if i] or [r["id"] for r in store.all() if r["state"] == "done"]:
            rec = store.get(rid)
            d = store.run_dir(rid)
            s = read_json(d / "out" / "run.json") or {}
            samples = sorted(p.name for p in (d / "out" / "samples").glob("step_*.png"))
            rows.append({"id": rid, "name": rec["name"], "state": rec["state"], "method": rec["params"]["method"],
                         "model": rec["params"]["model"], "weights": s.get("weights", rec["params"]["weights"]),
                         "steps": s.get("steps"), "seconds": s.get("seconds"),
                         "unet_forward_passes": s.get("unet_forward_passes"),
                         "peak_mib": (s.get("peak_memory_training") or {}).get("vmhwm_mib"),
                         "final_loss": s.get("final_loss_mean_last_10pct"), "output_bytes": s.get("output_bytes"),
                         "trainable_parameters": s.get("trainable_parameters"),
                         "grid": f"out/samples/{samples[-1]}" if samples else None,
                         "fidelity": (rec.get("evaluation") or {}).get("metrics", {})})
        return {"runs": rows}

    @app.get("/favicon.ico")
    async def favicon():
        return RedirectResponse("/static/favicon.svg")

    return app
