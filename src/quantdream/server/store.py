"""The data folder of `quantdream serve`: one folder per run, found again after a restart.

    DATA/runs/<run id>/
        job.json          the server's record: settings, state, process id, times, exit code, error line
        photos/           the subject's photos as uploaded (renamed 00.png, 01.jpg, ...) or copied from an example
        out/              `quantdream personalize --out` (config.toml, checkpoint.pt, samples/, run.json, exports)
        log.txt           the job's stdout + stderr, appended over resumes
        generations/<n>/  `quantdream generate --out` (gen.json, the images, grid.png, log.txt)

Every path a request may name is resolved here and must stay inside the data folder (``inside``); models are
chosen by name from those given to `quantdream serve`, never by path.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("queued", "running", "stopping", "stopped", "done", "failed")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")     # what `personalize` reads (data/dataset.py)
PIL_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
TOKEN_METHODS = ("zoodip", "zoodip-fast", "ti", "gf-ti")        # learn a token: learned_embeds.safetensors (+ .pt)


class RequestError(ValueError):
    """A request the server refuses: one line for the page, an HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServeConfig:
    """Everything `quantdream serve` is told on its command line."""

    data: str = "qd-data"                 # the data folder (created if missing)
    host: str = "127.0.0.1"
    port: int = 7860
    token: str = ""                       # required for a non-loopback host; checked on every request
    models: dict = field(default_factory=dict)   # name -> local SD folder or quantized folder (besides "embedded")
    examples: str = ""                    # folder of example subjects (examples/subjects); "" = look for it
    max_jobs: int = 1                     # jobs running at once
    max_upload_mib: float = 10.0          # per photo
    min_photos: int = 3
    max_photos: int = 6
    threads: int = 0                      # torch threads of each job (0: torch's choice)
    python: str = ""                      # interpreter of the jobs ("" = this one)


def inside(root: Path, *parts: str) -> Path:
    """root/parts resolved, refused unless it stays inside root (no '..', no absolute parts, no symlink out)."""
    root = root.resolve()
    p = root.joinpath(*parts).resolve()
    if p != root and root not in p.parents:
        raise RequestError("path outside the data folder refused", 403)
    return p


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id or ""):
        raise RequestError(f"no run {run_id!r}", 404)
    return run_id


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def slug(text: str, fallback: str = "run") -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")
    return s or fallback


def check_photo(name: str, data: bytes, max_bytes: int) -> str:
    """The file suffix to save an uploaded photo under; refuses non-images, unknown types and oversize files.
    The bytes are opened with Pillow: the name's suffix alone proves nothing."""
    shown = os.path.basename(name or "")[:80] or "(no name)"
    if len(data) > max_bytes:
        raise RequestError(f"{shown}: {len(data) / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} MiB limit "
                           f"per photo", 413)
    if not data:
        raise RequestError(f"{shown}: empty file", 415)
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(f"{shown}: not an image (png, jpg, webp or bmp expected)", 415) from None
    if fmt not in PIL_FORMATS:
        raise RequestError(f"{shown}: {fmt} images are not supported (png, jpg, webp or bmp expected)", 415)
    return PIL_FORMATS[fmt]


def find_examples(configured: str) -> Path | None:
    """The example subjects: --examples, else ./examples/subjects, else the source checkout's."""
    cands = [Path(configured)] if configured else [Path("examples/subjects"),
                                                   Path(__file__).resolve().parents[3] / "examples" / "subjects"]
    for c in cands:
        if c.is_dir():
            return c.resolve()
    return None


class Store:
    """Run records in memory, mirrored to DATA/runs/<id>/job.json (and gen.json) after every change."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.data).resolve()
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.runs: dict[str, dict] = {}
        self.examples = find_examples(cfg.examples)
        self.load()

    # ------------------------------------------------------------------ records
    def load(self) -> None:
        """Find every run (and its generations) in the data folder again."""
        for d in sorted(self.runs_dir.iterdir()):
            rec = read_json(d / "job.json")
            if not isinstance(rec, dict) or rec.get("id") != d.name:
                continue
            rec["generations"] = []
            for g in sorted((d / "generations").glob("*/gen.json")):
                gen = read_json(g)
                if isinstance(gen, dict):
                    rec["generations"].append(gen)
            self.runs[d.name] = rec

    def run_dir(self, run_id: str) -> Path:
        return inside(self.runs_dir, check_run_id(run_id))

    def get(self, run_id: str) -> dict:
        with self.lock:
            rec = self.runs.get(check_run_id(run_id))
            if rec is None:
                raise RequestError(f"no run {run_id!r}", 404)
            return rec

    def save(self, rec: dict) -> None:
        with self.lock:
            d = self.runs_dir / rec["id"]
            write_json(d / "job.json", {k: v for k, v in rec.items() if k != "generations"})
            for gen in rec.get("generations", []):
                write_json(d / "generations" / gen["id"] / "gen.json", gen)

    def new_id(self, name: str) -> str:
        with self.lock:
            base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(name)}"
            rid, i = base, 2
            while rid in self.runs or (self.runs_dir / rid).exists():
                rid, i = f"{base}-{i}", i + 1
            (self.runs_dir / rid).mkdir(parents=True)
            return rid

    def add(self, rec: dict) -> dict:
        with self.lock:
            rec.setdefault("generations", [])
            self.runs[rec["id"]] = rec
            self.save(rec)
            return rec

    def delete(self, run_id: str) -> None:
        with self.lock:
            rec = self.get(run_id)
            if rec["state"] in ("running", "stopping") or any(g["state"] in ("running", "stopping")
                                                                for g in rec["generations"]):
                raise RequestError("stop the run before deleting it", 409)
            shutil.rmtree(self.run_dir(run_id))
            del self.runs[run_id]

    def all(self) -> list[dict]:
        with self.lock:
            return sorted(self.runs.values(), key=lambda r: r["created"], reverse=True)

    # ------------------------------------------------------------------ photos
    def save_uploads(self, run_id: str, files: list[tuple[str, bytes]]) -> list[str]:
        """Check every photo first, then write them as 00.png, 01.jpg, ... (the names are ours, not the upload's)."""
        cfg = self.cfg
        if not cfg.min_photos <= len(files) <= cfg.max_photos:
            raise RequestError(f"upload {cfg.min_photos}-{cfg.max_photos} photos of the subject, got {len(files)}", 400)
        suffixes = [check_photo(name, data, int(cfg.max_upload_mib * 2**20)) for name, data in files]
        photos = self.run_dir(run_id) / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        names = []
        for i, ((_, data), suf) in enumerate(zip(files, suffixes)):
            names.append(f"{i:02d}{suf}")
            (photos / names[-1]).write_bytes(data)
        return names

    def example_subjects(self) -> list[dict]:
        if self.examples is None:
            return []
        out = []
        for d in sorted(self.examples.iterdir()):
            photos = sorted(p.name for p in d.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
            if photos:
                meta = read_json(d / "subject.json", {}) or {}
                out.append({"name": d.name, "class_word": meta.get("class_word", ""), "photos": photos})
        return out

    def copy_example(self, run_id: str, name: str) -> list[str]:
        ex = {e["name"]: e for e in self.example_subjects()}
        if name not in ex:
            raise RequestError(f"no example subject {name!r}", 400)
        src = inside(self.examples, name)
        photos = self.run_dir(run_id) / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        for p in ex[name]["photos"]:
            shutil.copyfile(src / p, photos / p)
        for extra in ("captions.json", "subject.json"):     # captions for training, subject.json for `evaluate`
            if (src / extra).is_file():
                shutil.copyfile(src / extra, photos / extra)
        return ex[name]["photos"]
