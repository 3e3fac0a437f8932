"""Training memory of personalization methods, each in a fresh subprocess (ecosystem.md, "Measuring
memory honestly"; style.md habit 10).

    quantdream bench memory --arch sd15 --methods zoodip,ti --resolution 512 --steps 3 --out bench/

One configuration = one ``python -m quantdream.bench.memory --spec JSON --result FILE`` process that

1. builds the architecture with random weights (``--arch tiny``: the embedded model's classes;
   ``sd15``/``sd21``: ``models.arch``), quantized the way the method runs. Quantized components are
   built layer by layer (meta device -> one random float layer -> its int codes), as loading a quantized
   folder does, so the whole float model never exists in the process;
2. encodes a couple of random reference images with the real data code (``SubjectImages``) and sets the
   method up through its real class on the shared ``DenoisingObjective``;
3. ``memory.reset_peak()`` (gc + ``malloc_trim(0)`` + ``clear_refs``), runs ``steps`` real training
   steps, then ``memory.peak()``: the training-phase VmHWM with RssAnon / RssFile apart, and on CUDA the
   allocator's max allocated / reserved;
4. saves the learned output the way a run does and reports its size on disk.

Whole-process peak = max(VmHWM of setup, VmHWM of training): everything the process ever held,
Python, torch and the model included. A method the build does not have yet gets a "not implemented"
row, not a crash; issue 5's methods plug in with :func:`register_bench_method`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

logger = logging.getLogger(__name__)

ARCHS = ("tiny", "sd15", "sd21", "sdxl")
NATIVE_RESOLUTION = {"tiny": 64, "sd15": 512, "sd21": 768, "sdxl": 1024}
# Every method of the two papers (issue 5). Those without a BenchMethod give a "not implemented" row.
KNOWN_METHODS = ("zoodip", "ti", "gf-ti", "dreambooth", "lora", "qlora", "peqa", "tuneqdm-s1", "tuneqdm-s2",
                 "tuneqdm")
WEIGHTS = ("int8", "int4", "none")


@dataclass(frozen=True)
class BenchSpec:
    """One measured configuration (everything the subprocess needs, JSON-serializable)."""

    arch: str = "tiny"            # tiny | sd15 | sd21 | sdxl
    method: str = "zoodip"
    resolution: int = 0           # 0: the architecture's native resolution
    steps: int = 3                # training steps measured (after setup)
    weights: str = ""             # "": as the method runs (BenchMethod.default_weights); int8 | int4 | none
    images: int = 2               # random reference images
    batch_size: int = 1
    seed: int = 0
    threads: int = 0              # torch CPU threads; 0: torch's default
    device: str = "auto"          # auto | cpu | cuda
    dtype: str = "auto"           # auto: float16 on CUDA, float32 on CPU
    low_memory: bool = False      # glibc returns freed blocks >= 4 MiB at once (memory.return_freed_memory_eagerly)

    def resolved_resolution(self) -> int:
        return self.resolution or NATIVE_RESOLUTION[self.arch]


class Trainer(Protocol):
    """What a method's bench setup hands back."""

    def step(self) -> Any: ...                          # one real training step
    def forward_passes(self) -> int: ...                # UNet forward passes of one sample so far
    def save(self, folder: Path) -> list[Path]: ...     # the learned output, as a run writes it


@dataclass(frozen=True)
class BenchMethod:
    """How ``bench memory`` runs one method. ``setup(components, data, spec)`` builds a Trainer on
    already built (and quantized) components; ``default_weights`` is how the method runs in its paper."""

    name: str
    default_weights: str
    setup: Callable[[dict, Any, BenchSpec], Trainer]
    archs: tuple[str, ...] = ("tiny", "sd15", "sd21")  # SDXL needs both text encoders (not in the scaffold yet)


BENCH_METHODS: dict[str, BenchMethod] = {}


def register_bench_method(method: BenchMethod) -> None:
    """Add (or replace) a method in ``bench memory`` (issue 5: dreambooth, lora, peqa, tuneqdm, gf-ti...)."""
    BENCH_METHODS[method.name] = method


# ----------------------------------------------------------------------------- token methods (TI, ZOODiP)
class _TokenTrainer:
    """A quantdream.methods token method (ti, zoodip, gf-ti...) on the shared objective, as train.py runs it."""

    token, init_word = "<bench-token>", "bag"

    def __init__(self, comps: dict, data, spec: BenchSpec) -> None:
        from ..methods import method_class
        from ..methods.base import DenoisingObjective, Streams, add_placeholder, config_from_dict
        cls = method_class(spec.method)
        te = comps["text_encoder"]
        self.placeholder = add_placeholder(comps["tokenizer"], te, self.token, self.init_word, 1)
        self.objective = DenoisingObjective(comps["tokenizer"], te, comps["unet"], comps["scheduler"],
                                            self.placeholder, device=comps["device"], dtype=comps["dtype"])
        # the method's own defaults (the paper's settings), as a run without overrides
        self.method = cls(self.objective, self.placeholder.init_vectors, config_from_dict(cls.config_class, {}, spec.method))
        self.streams = Streams.from_seed(spec.seed, comps["device"])
        self.data, self.batch_size = data, spec.batch_size

    def step(self):
        batch = self.data.sample(self.batch_size, self.streams.data, self.placeholder.text)
        return self.method.step(batch, self.streams)

    def forward_passes(self) -> int:
        return self.objective.forward_passes

    def save(self, folder: Path) -> list[Path]:
        from ..export import save_diffusers
        return [save_diffusers(folder, self.token, self.method.theta)]


for _name, _weights in (("zoodip", "int8"), ("ti", "none")):
    register_bench_method(BenchMethod(_name, _weights, _TokenTrainer))


def _implemented(name: str) -> BenchMethod | None:
    """The registered BenchMethod; a token method added to quantdream.methods later (gf-ti) works as is."""
    if name in BENCH_METHODS:
        return BENCH_METHODS[name]
    from ..methods import METHODS
    if name in METHODS and name in ("gf-ti",):
        return BenchMethod(name, "int8", _TokenTrainer)
    return None


# ----------------------------------------------------------------------------- building the model
def _init_param_(mod, name: str, t, generator) -> None:
    """The random init of ``models.arch``: weights N(0, 1/fan_in), embeddings N(0, 0.02^2), 1-D ones, biases 0."""
    from torch import nn
    if isinstance(mod, nn.Embedding):
        t.normal_(0.0, 0.02, generator=generator)
    elif name == "bias":
        t.zero_()
    elif t.dim() == 1:
        t.fill_(1.0)
    else:
        t.normal_(0.0, 1.0 / math.sqrt(max(1, math.prod(t.shape[1:]))), generator=generator)


def _materialize_(model, generator) -> None:
    """Replace every parameter still on the meta device with a random CPU one, one at a time."""
    import torch
    from torch import nn
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.empty(p.shape, dtype=p.dtype)
                _init_param_(mod, name, t, generator)
                mod._parameters[name] = nn.Parameter(t, requires_grad=p.requires_grad)


def build_quantized(arch: str, component: str, weights: str, seed: int = 0):
    """One SD component with random weights, quantized layer by layer: the model is built on the meta
    device, then each Linear/Conv2d gets a random float weight and is swapped for its quantized twin
    right away (``quant.quantize_model`` on that layer), so peak memory is the quantized model plus one
    float layer. ``weights="none"`` gives ``models.arch.build`` (float, random)."""
    import torch
    from torch import nn

    from ..memory import malloc_trim
    from ..models.arch import build
    from ..quant import quantize_model
    if weights == "none":
        return build(arch, component, seed=seed)
    model = build(arch, component, init="meta")
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]  # names only: holding
    for name in names:                                                                  # the modules would keep
        parent_name, _, attr = name.rpartition(".")                                     # every float weight
        parent = model.get_submodule(parent_name) if parent_name else model
        holder = nn.ModuleDict({"layer": getattr(parent, attr).to_empty(device="cpu")})
        for pname, p in holder["layer"].named_parameters(recurse=False):
            with torch.no_grad():
                _init_param_(holder["layer"], pname, p.data, gen)
        quantize_model(holder, weights)                      # the float weight is freed here
        setattr(parent, attr, holder["layer"])
        del holder
        malloc_trim()  # glibc would otherwise keep the freed float layers and the peak would count them
    _materialize_(model, gen)
    return model.eval()


def build_components(spec: BenchSpec, weights: str, device, dtype) -> dict:
    """tokenizer, text_encoder, vae, unet, scheduler with random weights, quantized as train.py does:
    UNet at ``weights``; VAE and text encoder int8 whenever the UNet is quantized (ZOODiP's setting)."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from ..models import embedded
    side = "none" if weights == "none" else "int8"
    if spec.arch == "tiny":
        torch.manual_seed(spec.seed)
        comps = embedded.build_components()
        from ..quant import quantize_model
        for m in ("text_encoder", "vae", "unet"):
            comps[m].requires_grad_(False).eval()
        quantize_model(comps["unet"], weights)
        quantize_model(comps["vae"], side)
        quantize_model(comps["text_encoder"], side)
    else:
        comps = {"unet": build_quantized(spec.arch, "unet", weights, spec.seed),
                 "vae": build_quantized(spec.arch, "vae", side, spec.seed + 1),
                 "text_encoder": build_quantized(spec.arch, "text_encoder", side, spec.seed + 2)}
        # token ids only matter as indices into a random table: the embedded model's CLIP-format
        # tokenizer, padded to the architecture's context length (77)
        n_ctx = comps["text_encoder"].config.max_position_embeddings
        comps["tokenizer"] = CLIPTokenizer.from_pretrained(str(embedded.TOKENIZER_DIR), model_max_length=n_ctx)
        comps["scheduler"] = DDPMScheduler(**embedded.SCHEDULER_CONFIG)
    for m in ("text_encoder", "vae", "unet"):
        comps[m] = comps[m].requires_grad_(False).eval().to(device=device, dtype=dtype)
    comps["device"], comps["dtype"] = device, dtype
    return comps


def _random_images(folder: Path, n: int, resolution: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- the measurement
def _base_row(spec: BenchSpec, weights: str) -> dict:
    return {"method": spec.method, "arch": spec.arch, "weights": weights, "resolution": spec.resolved_resolution(),
            "steps": spec.steps, "images": spec.images, "batch_size": spec.batch_size, "threads": spec.threads,
            "low_memory": spec.low_memory}


def check_spec(spec: BenchSpec) -> None:
    """Refuse settings that cannot be measured, in the user's words (before any subprocess starts)."""
    if spec.arch not in ARCHS:
        raise ValueError(f"--arch {spec.arch!r} is not one of {', '.join(ARCHS)}")
    if spec.weights and spec.weights not in WEIGHTS:
        raise ValueError(f"--weights {spec.weights!r} is not one of {', '.join(WEIGHTS)} (or leave it out: "
                         f"each method's own setting)")
    for name in ("steps", "images", "batch_size"):
        if getattr(spec, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.resolution < 0 or spec.threads < 0:
        raise ValueError(f"--resolution and --threads must be >= 0, got {spec.resolution} and {spec.threads}")
    if spec.arch != "tiny" and spec.resolved_resolution() % 8:
        raise ValueError(f"--resolution {spec.resolution} must be a multiple of 8 for {spec.arch}'s autoencoder")
    if spec.arch == "tiny" and spec.resolved_resolution() % 4:
        raise ValueError(f"--resolution {spec.resolution} must be a multiple of 4 for the embedded model's autoencoder")


def measure_in_process(spec: BenchSpec) -> dict:
    """Run one configuration in THIS process and return its row (call it in a fresh process)."""
    import torch

    from .. import memory
    from ..models.load import pick_device
    from ..train import resolve_dtype
    t_start = time.perf_counter()
    check_spec(spec)
    bm = _implemented(spec.method)
    weights = spec.weights or (bm.default_weights if bm else "none")
    row = _base_row(spec, weights)
    if bm is None:
        return {**row, "status": "not implemented",
                "note": f"method {spec.method!r} is not in this build yet (issue 5)"}
    if spec.arch not in bm.archs:
        return {**row, "status": "not implemented",
                "note": f"{spec.method} on {spec.arch} is not supported yet (the scaffold trains SD-1.x/2.x)"}
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.low_memory:
        eager = getattr(memory, "return_freed_memory_eagerly", None)
        if eager is None or not eager():
            return {**row, "status": "failed", "note": "--low-memory needs glibc's mallopt (not available here)"}
    device = torch.device(pick_device(spec.device))
    dtype = resolve_dtype(spec.dtype, device)
    res = spec.resolved_resolution()
    from ..data.dataset import SubjectImages
    with tempfile.TemporaryDirectory(prefix="qd-bench-") as tmp:
        # ---- setup: model (quantized as the method runs), data encoded once, the method
        comps = build_components(spec, weights, device, dtype)
        data = SubjectImages(_random_images(Path(tmp) / "images", spec.images, res, spec.seed), res)
        data.encode(comps["vae"], float(comps["vae"].config.scaling_factor), device=device, dtype=dtype)
        trainer = bm.setup(comps, data, spec)
        setup_seconds = time.perf_counter() - t_start
        setup_status = memory.proc_status()
        # ---- training phase
        memory.reset_peak()
        start_status = memory.proc_status()
        times = []
        for _ in range(spec.steps):
            t = time.perf_counter()
            loss = trainer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        train_peak = memory.peak()
        files = trainer.save(Path(tmp) / "out")
        storage = sum(Path(f).stat().st_size for f in files)
        passes = trainer.forward_passes()
        final_loss = float(loss) if isinstance(loss, torch.Tensor) else loss
    timed = times[1:] if len(times) > 1 else times          # the first step warms caches up
    whole = max(setup_status.get("vmhwm_mib", 0.0), train_peak.get("vmhwm_mib", 0.0))
    return {**row, "status": "ok", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "training_peak": train_peak, "training_start_rss_mib": start_status.get("vmrss_mib"),
            "setup_peak_mib": setup_status.get("vmhwm_mib"), "whole_process_peak_mib": whole,
            "storage_bytes": storage, "storage_files": [Path(f).name for f in files],
            "seconds_per_step": sum(timed) / len(timed), "step_seconds": times,
            "unet_forward_passes_per_step": passes / spec.steps, "setup_seconds": setup_seconds,
            "final_loss": final_loss, "torch": torch.__version__, "git": _git_revision()}


def run_in_subprocess(spec: BenchSpec, timeout: float | None = None, env: dict | None = None) -> dict:
    """One configuration in a fresh ``python -m quantdream.bench.memory`` process; a crash, a kill (e.g.
    out of memory) or a timeout becomes a ``failed`` row that says why."""
    check_spec(spec)
    with tempfile.TemporaryDirectory(prefix="qd-bench-") as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "quantdream.bench.run_one", "--spec", json.dumps(dataclasses.asdict(spec)),
               "--result", str(result)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return {**_base_row(spec, spec.weights), "status": "failed",
                    "note": f"timed out after {timeout:.0f} s"}
        if proc.returncode == 0 and result.is_file():
            row = json.loads(result.read_text())
            row["process_seconds"] = time.perf_counter() - t
            return row
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        why = "killed by the OS (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {**_base_row(spec, spec.weights), "status": "failed", "note": f"{why}: {' | '.join(tail)}"}


def bench_memory(specs: list[BenchSpec], timeout: float | None = None,
                 callback: Callable[[dict], None] | None = None) -> dict:
    """Measure each spec in its own subprocess -> {"rows": [...], "summary": {...}}."""
    for s in specs:
        check_spec(s)
    rows = []
    for s in specs:
        row = run_in_subprocess(s, timeout)
        rows.append(row)
        if callback is not None:
            callback(row)
    return {"rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """The lowest whole-process peak and every other method's ratio to it (same run, same settings)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return {}
    low = min(ok, key=lambda r: r["whole_process_peak_mib"])
    out = {"lowest_whole_process": f"{low['method']} ({low['weights']})",
           "whole_process_ratio_to_lowest": {f"{r['method']} ({r['weights']})":
                                             r["whole_process_peak_mib"] / low["whole_process_peak_mib"] for r in ok},
           "training_peak_ratio_to_lowest": {f"{r['method']} ({r['weights']})":
                                             r["training_peak"]["vmhwm_mib"] / low["training_peak"]["vmhwm_mib"]
                                             for r in ok}}
    cuda = [r for r in ok if "cuda_max_allocated_mib" in r["training_peak"]]
    if cuda:
        lowc = min(cuda, key=lambda r: r["training_peak"]["cuda_max_allocated_mib"])
        out["cuda_allocated_ratio_to_lowest"] = {
            f"{r['method']} ({r['weights']})":
                r["training_peak"]["cuda_max_allocated_mib"] / lowc["training_peak"]["cuda_max_allocated_mib"]
            for r in cuda}
    return out


def _fmt(x, spec: str = ".0f") -> str:
    return "" if x is None else format(x, spec)


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def memory_markdown(result: dict) -> str:
    """A markdown table of ``bench_memory``'s result (MiB unless stated)."""
    rows = result["rows"]
    head = ("| method | arch | weights | px | status | training VmHWM | RssAnon | RssFile | whole-process peak | "
            "CUDA alloc / reserved | storage | s/step | UNet passes/step |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        tp = r.get("training_peak", {})
        cuda = (f"{tp['cuda_max_allocated_mib']:.0f} / {tp['cuda_max_reserved_mib']:.0f}"
                if "cuda_max_allocated_mib" in tp else "")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        weights = (r["weights"] or "default") + (" (low-memory)" if r.get("low_memory") else "")
        lines.append(f"| {r['method']} | {r['arch']} | {weights} | {r['resolution']} | {status} | "
                     f"{_fmt(tp.get('vmhwm_mib'))} | {_fmt(tp.get('rss_anon_mib'))} | {_fmt(tp.get('rss_file_mib'))} | "
                     f"{_fmt(r.get('whole_process_peak_mib'))} | {cuda} | {_bytes(r.get('storage_bytes'))} | "
                     f"{_fmt(r.get('seconds_per_step'), '.3g')} | {_fmt(r.get('unet_forward_passes_per_step'), 'g')} |")
    s = result.get("summary") or {}
    if s.get("whole_process_ratio_to_lowest"):
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in s["whole_process_ratio_to_lowest"].items())
        lines.append("")
        lines.append(f"Whole-process peak relative to the lowest ({s['lowest_whole_process']}): {ratios}.")
    lines.append("")
    lines.append("Training VmHWM: process high-water mark over the training steps only (after setup, gc and "
                 "malloc_trim); whole-process: the maximum over setup and training. Random weights; each row "
                 "is a fresh subprocess.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The subprocess entry point: ``--spec JSON --result FILE``."""
    ap = argparse.ArgumentParser(description="one bench-memory configuration (used by `quantdream bench memory`)")
    ap.add_argument("--spec", required=True, help="BenchSpec as JSON")
    ap.add_argument("--result", required=True, help="where to write the row (JSON)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    spec = BenchSpec(**json.loads(a.spec))
    row = measure_in_process(spec)
    Path(a.result).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
