"""A GPU check ready to run: every method for a few real training steps on CUDA, on the SD-1.5
architecture at 512 px and on the embedded model, all random weights, into one JSON.

    scripts/gpu_check.sh --out results/            # = python -m quantdream.bench.gpu_check --out results/
    scripts/gpu_check.sh --device cpu --dry-run --out out/gpu-check    # the same plan, 1 step, tiny models

Each (model, method) of the plan is one ``bench memory`` configuration (:mod:`quantdream.bench.memory`:
the model prepared as the method runs it, int8/int4 runs loading a quantized folder as ``personalize
--model DIR`` does, the method's own ``setup`` / ``step`` / ``export``), measured in a fresh process so
the CUDA figures belong to that method alone and a crash stops nothing else: forked from a forkserver that
imported torch, diffusers and transformers once and never touched CUDA (a few seconds less per run; if the
first CUDA run cannot initialise CUDA or hangs, the check falls back to a fresh interpreter per run, which
``--launcher subprocess`` asks for from the start). SD-1.5's int8 folder is written by a CPU-only process
in the background while the embedded runs use the GPU. Per run it records

- ``cuda_max_allocated_mib``: ``torch.cuda.max_memory_allocated`` over setup and training (the figure
  the papers' PyTorch profiler reports), with the training steps alone and ``max_memory_reserved`` beside;
- ``process_total_mib``: what the process holds on the device as ``nvidia-smi`` shows it (CUDA context,
  cuBLAS/cuDNN workspaces and the allocator's cache included): the peak of ``total - free`` from
  ``torch.cuda.mem_get_info``, sampled every 20 ms in the process and once more after training (the
  allocator keeps what it reserved, so the last sample bounds the peak from below); the device holds
  nothing else while a run is measured. ``nvidia_smi_used_mib``: the peak of ``nvidia-smi
  --query-compute-apps`` for the run's process where nvidia-smi lists it (null where it does not, e.g.
  in a container);
- ``seconds_per_step`` (steps after the first, which warms caches up), ``iterations_per_second``,
  ``unet_forward_passes_per_step`` and in all, ``final_loss``;
- ``status``: ``ok``, ``failed`` (``error``: the exception's last line), ``skipped`` (``note``: why, e.g.
  bitsandbytes missing for qlora) or ``not run (budget)``.

The JSON is rewritten after every run, so a kill leaves every finished run on disk. ``--budget-s``
(default 540) stops starting runs whose estimated time (the median run of the same model so far, or a
first guess) would pass it, and kills a run still going when it is spent. The plan runs the embedded
model first (every method, seconds each), then SD-1.5: zoodip, ti, dreambooth, lora, peqa, tuneqdm, the
others. ``--dry-run`` runs the same plan and writes the same JSON with 1 step on tiny stand-ins of the
same architectures (SD-1.5's component classes and block layout at a few channels, 64 px), in about a
minute on an idle 2-core CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from ..methods import METHODS
from .memory import BenchSpec, check_spec

# as the CLI: quiet the model libraries' import chatter; bitsandbytes' failed fetch of an optional CPU kernel
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

SCHEMA = "quantdream.gpu_check/1"
MODELS = {"embedded": "tiny", "sd15": "sd15"}            # model name -> bench architecture
SD15_ORDER = ("zoodip", "ti", "dreambooth", "lora", "peqa", "tuneqdm", "zoodip-fast", "gf-ti",
              "tuneqdm-s2", "tuneqdm-s1", "qlora")
STATUSES = ("ok", "failed", "skipped", "not run (budget)")
FIRST_GUESS_S = {"embedded": 20.0, "sd15": 60.0}          # a run's time before one of its model has run
FIRST_FORK_TIMEOUT_S = 45.0                                # the first forked CUDA run (an embedded one: seconds)
FORK_CUDA_ERRORS = ("initialization error", "re-initialize CUDA", "forked subprocess", "cudaErrorInitializationError",
                    "CUDA driver initialization failed", "CUDA_ERROR_NOT_INITIALIZED")
FOLDER_GUESS_S = 60.0                                      # writing SD-1.5's int8 folder (overlaps the embedded runs)
# Tiny stand-ins of SD-1.5's components for --dry-run: the same classes and block layout, a few channels.
DRY_RUN_SD15 = {
    "unet": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 256,
             "attention_head_dim": 4},
    # 256 wide: GF-TI's 256-d PCA subspace of the token table needs d >= 256
    "text_encoder": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "projection_dim": 256},
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
}
ROW_KEYS = ("model", "arch", "method", "weights", "resolution", "steps", "status", "cuda_max_allocated_mib",
            "cuda_max_reserved_mib", "process_total_mib", "nvidia_smi_used_mib", "seconds_per_step",
            "iterations_per_second", "unet_forward_passes", "unet_forward_passes_per_step", "wall_s")


@dataclass(frozen=True)
class Run:
    """One entry of the plan."""

    model: str          # embedded | sd15
    method: str
    resolution: int
    steps: int

    @property
    def arch(self) -> str:
        return MODELS[self.model]


def plan(steps: int = 3, dry_run: bool = False, models=("embedded", "sd15"), methods=METHODS) -> list[Run]:
    """The runs in the order they start: the embedded model with every method first (seconds each), then
    SD-1.5 at 512 px (64 px stand-in in a dry run) with the most asked-for methods first."""
    res = {"embedded": 64, "sd15": 64 if dry_run else 512}
    order = {"embedded": METHODS, "sd15": SD15_ORDER}
    return [Run(m, meth, res[m], 1 if dry_run else steps) for m in models for meth in order[m] if meth in methods]


def skip_reason(method: str, device: str) -> str | None:
    """Why a method cannot run here at all (checked without importing anything)."""
    if method == "qlora" and find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (qlora's NF4 Linear4bit base needs it); pip install bitsandbytes"
    if method in ("lora", "qlora") and find_spec("peft") is None:
        return "peft is not installed (LoRA's adapters); pip install peft"
    return None


# ----------------------------------------------------------------------------- the measured process
def use_dry_run_archs() -> None:
    """Make ``models.arch`` build SD-1.5 as the tiny stand-in of :data:`DRY_RUN_SD15` (this process only)."""
    from ..models import arch
    full = arch._spec

    def small(name: str) -> dict:
        spec = json.loads(json.dumps(full(name)))
        if name == "sd15":
            for comp, changes in DRY_RUN_SD15.items():
                spec[comp]["config"].update(changes)
        return spec
    arch._spec = small


class DeviceSampler:
    """Peak of ``total - free`` device memory (``torch.cuda.mem_get_info``) while the process runs: a
    thread samples every ``every`` seconds once this process has initialised CUDA."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.peak_mib, self.total_mib = every, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def sample(self) -> None:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info(torch.cuda.current_device())
            used = (total - free) / 2**20
            self.total_mib = total / 2**20
            self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a failed sample must not end the run
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.sample()
        except Exception:  # noqa: BLE001
            pass


def measure(spec: BenchSpec, dry_run: bool) -> dict:
    """One run in THIS process: ``bench.memory.measure_in_process`` with the CUDA peak of setup kept (its
    ``reset_peak`` clears the allocator's peak before training) and the process's device total sampled.
    Any exception becomes a ``failed`` row with the exception's last line."""
    t0 = time.perf_counter()
    if dry_run:
        use_dry_run_archs()
    from .. import memory
    from .memory import measure_in_process
    setup = {}
    reset = memory.reset_peak

    def reset_keeping_setup_peak() -> bool:
        cuda = memory._cuda()
        if cuda is not None:
            cuda.synchronize()
            setup["allocated"] = cuda.max_memory_allocated() / memory.MIB
            setup["reserved"] = cuda.max_memory_reserved() / memory.MIB
        return reset()
    memory.reset_peak = reset_keeping_setup_peak
    with DeviceSampler() as sampler:
        try:
            row = measure_in_process(spec)
        except BaseException as e:  # noqa: BLE001 - the row says what failed
            tb = traceback.format_exc().strip().splitlines()
            row = {"status": "failed", "error": f"{type(e).__name__}: {e}".strip().splitlines()[-1][:500],
                   "traceback_tail": tb[-8:]}
    gpu = {}
    tp = row.get("training_peak", {})
    if "cuda_max_allocated_mib" in tp:
        gpu = {"cuda_max_allocated_mib": max(tp["cuda_max_allocated_mib"], setup.get("allocated", 0.0)),
               "cuda_max_reserved_mib": max(tp["cuda_max_reserved_mib"], setup.get("reserved", 0.0)),
               "cuda_training_max_allocated_mib": tp["cuda_max_allocated_mib"],
               "cuda_setup_max_allocated_mib": setup.get("allocated")}
    if sampler.peak_mib is not None:
        import torch
        gpu.update(process_total_mib=sampler.peak_mib, device_total_mib=sampler.total_mib,
                   gpu_name=torch.cuda.get_device_name(), cuda_version=torch.version.cuda)
    return {**row, **gpu, "process_wall_s": time.perf_counter() - t0}


def _noop() -> None:
    """The forkserver's warm-up run."""


def _child(spec_json: str, result: str, log: str, dry_run: bool) -> None:
    """A forked run (``--launcher fork``): output to ``log``, the row to ``result``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    row = measure(BenchSpec(**json.loads(spec_json)), dry_run)
    Path(result).write_text(json.dumps(row, default=str) + "\n")


# ----------------------------------------------------------------------------- launching runs
class NvidiaSmi:
    """Peak ``used_memory`` of one pid in ``nvidia-smi --query-compute-apps``, polled in a thread
    (nothing where nvidia-smi is missing or does not list the process)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every, self.peak_mib = pid, every, None
        self.exe = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.exe:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                out = subprocess.run([self.exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,"
                                      "nounits"], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0] == str(self.pid) and parts[1].isdigit():
                    self.peak_mib = max(self.peak_mib or 0.0, float(parts[1]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.exe:
            self._thread.join()


def _tail(path: Path, n: int = 3) -> list[str]:
    try:
        return [ln for ln in path.read_text(errors="replace").strip().splitlines() if ln.strip()][-n:]
    except OSError:
        return []


class Launcher:
    """Starts each run in a fresh process: ``subprocess`` (a new interpreter, the default) or ``fork``
    (forked from a forkserver that imported torch, diffusers and transformers once and never touched
    CUDA: a few seconds less per run)."""

    def __init__(self, kind: str, dry_run: bool, workdir: Path) -> None:
        self.kind, self.dry_run, self.workdir = kind, dry_run, workdir
        self.forked_cuda_checked = False     # the first forked CUDA run has worked
        if kind == "fork":
            import multiprocessing as mp
            # torch.cuda.is_available() through NVML in the forkserver, never cuInit (not fork-safe); nothing
            # preloaded touches CUDA (only bitsandbytes asks at import, and then through this check)
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(["quantdream.cli.main", "torch", "diffusers", "transformers",
                                             "quantdream.bench.memory", "quantdream.train",
                                             "quantdream.models.embedded", "quantdream.models.arch"])

    def warm_up(self, timeout: float = 300.0) -> float | None:
        """Start the forkserver (its imports: cold caches on a fresh machine can take tens of seconds) with a
        run that does nothing, so that no run's time or timeout includes it; seconds taken (None: subprocess)."""
        if self.kind != "fork":
            return None
        t = time.perf_counter()
        proc = self.ctx.Process(target=_noop)
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return time.perf_counter() - t

    def run(self, spec: BenchSpec, name: str, timeout: float) -> dict:
        result, log = self.workdir / f"{name}.json", self.workdir / f"{name}.log"
        spec_json = json.dumps(dataclasses.asdict(spec))
        if self.kind == "fork":
            proc = self.ctx.Process(target=_child, args=(spec_json, str(result), str(log), self.dry_run))
            proc.start()
            try:
                with NvidiaSmi(proc.pid) as smi:
                    proc.join(timeout)
                    timed_out = proc.is_alive()
            finally:                       # also when this process is interrupted: no orphan holds the GPU
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            code = proc.exitcode
        else:
            cmd = [sys.executable, "-m", "quantdream.bench.gpu_check", "--child", spec_json, "--result", str(result)]
            if self.dry_run:
                cmd.append("--dry-run")
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
                try:
                    with NvidiaSmi(proc.pid) as smi:
                        code, timed_out = proc.wait(timeout), False
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:                   # also when this process is interrupted: no orphan holds the GPU
                    if proc.poll() is None:
                        os.killpg(proc.pid, 9)
                    code = proc.wait()
        if timed_out:
            return {"status": "failed", "error": f"killed after {timeout:.0f} s (time limit)",
                    "log_tail": _tail(log, 8), "nvidia_smi_used_mib": smi.peak_mib}
        if code == 0 and result.is_file():
            return {**json.loads(result.read_text()), "nvidia_smi_used_mib": smi.peak_mib}
        why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
        tail = _tail(log)
        return {"status": "failed", "error": f"{why}: {tail[-1] if tail else 'no output'}", "log_tail": _tail(log, 8),
                "nvidia_smi_used_mib": smi.peak_mib}

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the check
def _row(run: Run, weights: str, measured: dict | None = None, **extra) -> dict:
    """One run's JSON row: :data:`ROW_KEYS` first (null where not measured), then the bench row."""
    m = dict(measured or {})
    row = {k: None for k in ROW_KEYS}
    row.update(model=run.model, arch=run.arch, method=run.method, weights=weights, resolution=run.resolution,
               steps=run.steps)
    for k in ROW_KEYS[7:]:
        if k in m:
            row[k] = m[k]
    s = m.get("seconds_per_step")
    if s:
        row["seconds_per_step"], row["iterations_per_second"] = s, 1.0 / s
    if m.get("unet_forward_passes_per_step") is not None:
        row["unet_forward_passes"] = m["unet_forward_passes_per_step"] * run.steps
    row["status"] = m.get("status", "failed")
    if "whole_process_peak_mib" in m:
        row["cpu_whole_process_peak_mib"] = m["whole_process_peak_mib"]
    if "model" in m:     # bench memory's "quantized folder, loaded as --model DIR" or "built layer by layer"
        row["model_source"] = m.pop("model")
    for k in ("error", "note", "log_tail", "traceback_tail"):
        if m.get(k):
            row[k] = m[k]
    row.update(extra)
    keep = {k: v for k, v in m.items() if k not in row and k != "whole_process_peak_mib"}
    if keep:
        row["bench"] = keep
    return row


def _default_weights(method: str) -> str:
    from .memory import _implemented
    return _implemented(method).default_weights


def _gpu_info() -> dict:
    """The device as nvidia-smi names it (without touching CUDA in this process)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"nvidia_smi": None}
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.used,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia_smi": f"failed: {e}"}
    return {"nvidia_smi": out.strip().splitlines()}


def _device_used_mib() -> float | None:
    """Memory in use on the device (all processes) as nvidia-smi reports it; None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout.split()
        return float(out[0]) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class FolderWriter:
    """SD-1.5's random-weight int8 folder (``bench.memory.write_random_folder``), written by a CPU-only
    process in the background while the embedded model's runs use the GPU."""

    def __init__(self, arch: str, weights: str, out: Path, dry_run: bool, log: Path) -> None:
        self.out, self.log, self.started = out, log, time.perf_counter()
        cmd = [sys.executable, "-m", "quantdream.bench.gpu_check", "--write-folder", arch, weights, str(out)]
        if dry_run:
            cmd.append("--dry-run")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        self.file = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    def wait(self, timeout: float) -> str | None:
        """None once the folder is written, else why not (it is then killed)."""
        try:
            code = self.proc.wait(max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            return "not written within the budget"
        finally:
            self.file.close()
        if code != 0:
            tail = _tail(self.log)
            return f"writing it failed (exit code {code}): {tail[-1] if tail else 'no output'}"
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.file.close()


class Check:
    """Runs the plan, rewriting ``out/gpu_check.json`` after every run and logging to ``out/gpu_check.log``."""

    def __init__(self, args) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = self.out / "gpu_check.json", self.out / "gpu_check.log"
        self.runs = plan(args.steps, args.dry_run, args.models, args.methods)
        self.weights = {r: _default_weights(r.method) for r in self.runs}
        self.rows: list[dict] = [_row(r, self.weights[r], {"status": "not run (budget)"},
                                      note="not reached yet") for r in self.runs]
        self.doc = {"schema": SCHEMA, "dry_run": args.dry_run, "device": args.device,
                    "settings": {"budget_s": args.budget_s, "steps": 1 if args.dry_run else args.steps,
                                 "launcher": args.launcher, "run_timeout_s": args.run_timeout_s,
                                 "models": list(args.models), "methods": list(args.methods)},
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "host": {"python": sys.version.split()[0], "cpus": os.cpu_count(), **_gpu_info()},
                    "plan": [f"{r.model}/{r.method}" for r in self.runs], "runs": self.rows, "finished": False}
        self.log_file = open(self.log_path, "a")

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.doc["elapsed_s"] = self.elapsed()
        self.doc["summary"] = {s: sum(r["status"] == s for r in self.rows) for s in STATUSES}
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.json_path)

    def run(self) -> int:
        a = self.args
        self.save()
        self.log(f"gpu check: {len(self.runs)} runs, device {a.device}, budget {a.budget_s:.0f} s"
                 + (", dry run (tiny stand-ins, 1 step)" if a.dry_run else ""))
        work = Path(tempfile.mkdtemp(prefix="qd-gpu-check-"))
        self.launcher = Launcher(a.launcher, a.dry_run, work)
        folders: dict[tuple, FolderWriter | Path | str] = {}
        for r in self.runs:     # quantized SD-1.5 folders: written in the background from the start
            w = self.weights[r]
            if r.model != "embedded" and w in ("int8", "int4") and skip_reason(r.method, a.device) is None \
                    and (r.arch, w) not in folders:
                folders[(r.arch, w)] = FolderWriter(r.arch, w, work / f"{r.arch}-{w}", a.dry_run,
                                                    work / f"folder-{r.arch}-{w}.log")
        walls: dict[str, list[float]] = {}
        old_handler = signal.signal(signal.SIGTERM, _terminate)
        try:
            warm = self.launcher.warm_up()
            if warm is not None:
                self.doc["settings"]["launcher_warm_up_s"] = warm
                self.log(f"forkserver ready (torch, diffusers, transformers imported) in {warm:.1f} s")
            queue = list(range(len(self.runs)))
            while queue:
                i = self._next(queue, folders)
                self.doc["running"] = self.doc["plan"][i]
                self._one(i, self.runs[i], folders, walls)
                self.save()
            self.doc.pop("running")
        except (KeyboardInterrupt, SystemExit) as e:
            self.doc["interrupted"] = f"{type(e).__name__} during {self.doc.get('running')}"
            if self.doc.get("running"):
                i = self.doc["plan"].index(self.doc["running"])
                self.rows[i] = _row(self.runs[i], self.weights[self.runs[i]],
                                    {"status": "failed", "error": f"interrupted ({type(e).__name__}) while running"})
            self.save()
            self.log(f"interrupted ({self.doc['interrupted']}); {self.json_path} has every finished run")
            raise
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            for f in folders.values():
                if isinstance(f, FolderWriter):
                    f.kill()
            self.launcher.close()
            shutil.rmtree(work, ignore_errors=True)
        self.doc["finished"] = True
        self.save()
        s = self.doc["summary"]
        self.log("done: " + ", ".join(f"{v} {k}" for k, v in s.items()) + f"; wrote {self.json_path}")
        self.log_file.close()
        return 1 if s["failed"] else 0

    def _next(self, queue: list[int], folders: dict) -> int:
        """The next run in plan order, except that a run whose quantized folder is still being written
        lets the runs that do not need it go first (the GPU does not wait for the folder)."""
        def waits(i: int) -> bool:
            f = folders.get((self.runs[i].arch, self.weights[self.runs[i]]))
            return isinstance(f, FolderWriter) and f.proc.poll() is None
        i = next((j for j in queue if not waits(j)), queue[0])
        if i != queue[0]:
            self.log(f"{self.doc['plan'][queue[0]]}: its folder is not written yet; {self.doc['plan'][i]} first")
        queue.remove(i)
        return i

    def _launch(self, spec: BenchSpec, name: str, timeout: float) -> dict:
        """One run; the first forked run on CUDA is watched: a CUDA initialisation error or a hang there
        (CUDA state inherited across fork) switches the check to fresh interpreters and runs it again."""
        launcher = self.launcher
        if launcher.kind != "fork" or spec.device == "cpu" or launcher.forked_cuda_checked:
            return launcher.run(spec, name, timeout)
        m = launcher.run(spec, name, min(timeout, FIRST_FORK_TIMEOUT_S))
        err = m.get("error", "") if m.get("status") == "failed" else ""
        if err and (any(p in err for p in FORK_CUDA_ERRORS) or err.startswith("killed after")):
            self.log(f"{spec.arch}/{spec.method}: forked run failed ({err}); fresh interpreters from now on")
            self.launcher = Launcher("subprocess", launcher.dry_run, launcher.workdir)
            self.doc["settings"]["launcher"] = f"fork, then subprocess (fork failed: {err[:200]})"
            return self.launcher.run(spec, name + "-again", max(1.0, timeout - FIRST_FORK_TIMEOUT_S))
        launcher.forked_cuda_checked = m.get("status") == "ok"
        return m

    def _one(self, i: int, r: Run, folders: dict, walls: dict) -> None:
        a, w = self.args, self.weights[r]
        name = f"{r.model}/{r.method}"
        why = skip_reason(r.method, a.device)
        if why:
            self.rows[i] = _row(r, w, {"status": "skipped", "note": why})
            self.log(f"{name}: skipped ({why})")
            return
        left = a.budget_s - self.elapsed()
        done = walls.get(r.model)          # wall times of this model's runs so far
        guess = statistics.median(done) if done else FIRST_GUESS_S[r.model] if not a.dry_run else 5.0
        model_dir, note = "", None
        key = (r.arch, w)
        pending = folders.get(key)
        if isinstance(pending, FolderWriter):
            guess += max(0.0, FOLDER_GUESS_S - (time.perf_counter() - pending.started)) if not a.dry_run else 0.0
        if guess > left:
            self.rows[i] = _row(r, w, {"status": "not run (budget)",
                                       "note": f"{left:.0f} s left of the budget, about {guess:.0f} s needed"})
            self.log(f"{name}: not run (budget: {left:.0f} s left, about {guess:.0f} s needed)")
            return
        if isinstance(pending, FolderWriter):
            self.log(f"{name}: waiting for the {r.arch} {w} folder")
            failed = pending.wait(left - 1.0)
            folders[key] = failed or pending.out
            if failed:
                self.log(f"{r.arch} {w} folder: {failed}; building the model layer by layer instead")
        if isinstance(folders.get(key), Path):
            model_dir = str(folders[key])
        elif isinstance(folders.get(key), str):
            note = f"the quantized folder could not be written ({folders[key]}): model built layer by layer"
        spec = BenchSpec(arch=r.arch, method=r.method, resolution=r.resolution, steps=r.steps, seed=0,
                         device=a.device, model_dir=model_dir, threads=a.threads)
        check_spec(spec)
        left = a.budget_s - self.elapsed()
        if left < 2.0:
            self.rows[i] = _row(r, w, {"status": "not run (budget)", "note": "budget spent"})
            self.log(f"{name}: not run (budget spent)")
            return
        before = _device_used_mib()
        t = time.perf_counter()
        m = self._launch(spec, f"{i:02d}-{r.model}-{r.method}", min(left, a.run_timeout_s))
        wall = time.perf_counter() - t
        if m.get("error", "").endswith("(time limit)"):
            m["error"] = m["error"].replace("(time limit)", "(--run-timeout-s)" if a.run_timeout_s < left else
                                            "(the check's --budget-s ran out)")
        walls.setdefault(r.model, []).append(wall)
        extra = {"wall_s": wall, "device_used_before_mib": before, **({"model_note": note} if note else {})}
        self.rows[i] = _row(r, w, m, **extra)
        row = self.rows[i]
        if row["status"] == "ok":
            self.log(f"{name} ({w}): ok, CUDA max allocated {_mib(row['cuda_max_allocated_mib'])}, process total "
                     f"{_mib(row['process_total_mib'])}, nvidia-smi {_mib(row['nvidia_smi_used_mib'])}, "
                     f"{row['seconds_per_step']:.3g} s/step ({row['iterations_per_second']:.3g} it/s), "
                     f"{row['unet_forward_passes_per_step']:g} UNet passes/step, {wall:.1f} s")
        else:
            self.log(f"{name} ({w}): {row['status']}: {row.get('error', row.get('note', ''))}")
            for line in row.get("traceback_tail") or row.get("log_tail") or []:
                self.log(f"    {line}")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _mib(x) -> str:
    return "n/a" if x is None else f"{x:.0f} MiB"


def validate(doc: dict) -> list[str]:
    """Problems with a gpu_check.json (empty: it follows the schema)."""
    bad = []
    for k in ("schema", "dry_run", "device", "settings", "plan", "runs", "finished", "summary", "elapsed_s"):
        if k not in doc:
            bad.append(f"missing {k!r}")
    if bad:
        return bad
    if doc["schema"] != SCHEMA:
        bad.append(f"schema {doc['schema']!r} is not {SCHEMA!r}")
    if len(doc["runs"]) != len(doc["plan"]):
        bad.append(f"{len(doc['runs'])} runs for a plan of {len(doc['plan'])}")
    for name, row in zip(doc["plan"], doc["runs"]):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            bad.append(f"{name}: missing {missing}")
            continue
        if f"{row['model']}/{row['method']}" != name:
            bad.append(f"{name}: row is {row['model']}/{row['method']}")
        if row["status"] not in STATUSES:
            bad.append(f"{name}: status {row['status']!r}")
        if row["status"] == "ok":
            for k in ("seconds_per_step", "iterations_per_second", "unet_forward_passes_per_step", "wall_s"):
                if not isinstance(row[k], (int, float)) or row[k] < 0:
                    bad.append(f"{name}: {k} = {row[k]!r}")
            if doc["device"] != "cpu":
                for k in ("cuda_max_allocated_mib", "process_total_mib"):
                    if not isinstance(row[k], (int, float)) or row[k] <= 0:
                        bad.append(f"{name}: {k} = {row[k]!r}")
        elif row["status"] == "failed" and not row.get("error"):
            bad.append(f"{name}: failed without an error")
        elif row["status"] in ("skipped", "not run (budget)") and not row.get("note"):
            bad.append(f"{name}: {row['status']} without a note")
    if doc["summary"] != {s: sum(r.get("status") == s for r in doc["runs"]) for s in STATUSES}:
        bad.append("summary does not count the runs")
    return bad


def has_gpu() -> bool:
    """A GPU driver is visible (checked without importing torch or touching CUDA)."""
    return bool(shutil.which("nvidia-smi")) or any(Path(p).exists() for p in (
        "/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="gpu_check", description="Every method for a few real training steps on the embedded model and on "
        "SD-1.5 at 512 px (random weights), each in a fresh process: CUDA peak memory (max allocated, the "
        "process's total as nvidia-smi shows it), s/step, it/s, UNet passes. Writes OUT/gpu_check.json "
        "after every run and OUT/gpu_check.log.")
    a = ap.add_argument
    a("--out", help="folder for gpu_check.json and gpu_check.log")
    a("--device", default="cuda", choices=["cuda", "cpu"], help="default cuda")
    a("--dry-run", dest="dry_run", action="store_true",
      help="the same plan with 1 step on tiny stand-ins (SD-1.5's classes at a few channels, 64 px); checks the JSON")
    a("--budget-s", dest="budget_s", type=float, default=540.0,
      help="seconds for the whole check (default 540): runs that would not fit are recorded 'not run (budget)'")
    a("--steps", type=int, default=3, help="training steps per run (default 3; the first is not timed)")
    a("--run-timeout-s", dest="run_timeout_s", type=float, default=240.0,
      help="seconds before one run is killed (default 240)")
    a("--models", default="embedded,sd15", help="comma-separated: embedded, sd15 (default both)")
    a("--methods", default=",".join(METHODS), help="comma-separated methods (default all)")
    a("--launcher", choices=["fork", "subprocess"], default="fork",
      help="fork: each run forked from a process that imported torch, diffusers and transformers once and never "
           "touched CUDA (default; a few seconds less per run; if the first CUDA run fails to initialise CUDA "
           "the check falls back to subprocess); subprocess: a fresh interpreter per run")
    a("--threads", type=int, default=0, help="torch CPU threads per run (default: torch's choice)")
    # internal entry points
    a("--child", help=argparse.SUPPRESS)
    a("--result", help=argparse.SUPPRESS)
    a("--write-folder", dest="write_folder", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is None and args.write_folder is None:
        if not args.out:
            ap.error("--out is required")
        args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        for m in args.models:
            if m not in MODELS:
                ap.error(f"--models: unknown model {m!r} (models: {', '.join(MODELS)})")
        for m in args.methods:
            if m not in METHODS:
                ap.error(f"--methods: unknown method {m!r} (methods: {', '.join(METHODS)})")
        if args.budget_s <= 0 or args.steps < 1 or args.run_timeout_s <= 0:
            ap.error("--budget-s and --run-timeout-s must be > 0 and --steps >= 1")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            ap.error(f"--out {args.out!r} is a file; give a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:        # one measured run in this fresh interpreter
        row = measure(BenchSpec(**json.loads(args.child)), args.dry_run)
        Path(args.result).write_text(json.dumps(row, default=str) + "\n")
        return 0
    if args.write_folder is not None:
        if args.dry_run:
            use_dry_run_archs()
        from .memory import write_random_folder
        arch, weights, out = args.write_folder
        write_random_folder(arch, weights, 0, Path(out))
        return 0
    if args.device == "cuda" and not has_gpu():
        print("gpu_check: --device cuda but no GPU here (no nvidia-smi, no /dev/nvidia*, no /dev/kfd); "
              "use --device cpu --dry-run", file=sys.stderr)
        return 2
    check = Check(args)
    code = check.run()
    bad = validate(json.loads(check.json_path.read_text()))
    if bad:
        print("gpu_check: the JSON does not follow its schema: " + "; ".join(bad), file=sys.stderr)
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
