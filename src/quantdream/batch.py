"""Many personalization jobs on Ray: ``quantdream batch JOBS.toml``.

Every job (one subject, one method) is one Ray task with a CPU and a memory request, so the scheduler never
runs more jobs at once than the machine (or cluster) holds. A task trains with ``train.personalize`` in a Ray
worker process and writes its run folder as ``quantdream personalize`` does. Workers are kept between jobs, so
torch and the model libraries are imported once per worker, not once per job (each job sets its own threads and
measures its own training peak: VmHWM is reset before its first step). A worker that
dies (killed, out of memory) is started again by Ray (``max_retries``); the new attempt continues from the
run's last checkpoint (``--resume`` semantics), so only the work since that checkpoint is lost.

JOBS.toml::

    [defaults]                  # any job key; every job inherits it
    model = "tiny"
    steps = 200
    set = ["sample_steps=10"]

    [[job]]
    subject = "examples/subjects/teal_bag"     # photos + subject.json, or plain photos with init_word
    method = "zoodip"

    [[job]]
    name = "bag-ti"                            # default: <subject folder>-<method>
    subject = "examples/subjects/teal_bag"
    method = "ti"
    token = "<my-bag>"                         # default: <subject name>
    set = ["ti.lr=0.005"]

Ray is imported only here, and only when a batch runs (``pip install 'quantdream[batch]'``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

JOB_KEYS = {"name", "subject", "method", "token", "init_word", "steps", "seed", "weights", "model", "device",
            "checkpoint_every", "threads", "memory_mib", "set"}
REQUIRED = ("subject", "method")

# Whole-process peak memory (MiB) of one training process on the SD-1.5 architecture at 512 px, default mode:
# `quantdream compare --memory-arch sd15` (benchmarks/results/comparison_memory-sd15-2026-11-23.json);
# zoodip-fast is not in that run: zoodip's figure x 1.08, the ratio of the two in the low-memory run.
SD15_PEAK_MIB = {"zoodip": 2095, "zoodip-fast": 2270, "ti": 6374, "gf-ti": 2470, "dreambooth": 16677,
                 "lora": 7182, "qlora": 4122, "peqa": 4000, "tuneqdm": 4179, "tuneqdm-s1": 4028, "tuneqdm-s2": 4003}
# The embedded model ('tiny'): an estimate, about 1.5x the largest whole-process peak seen on it (torch + the
# model libraries + one worker's Ray client dominate; the model itself is a few MiB).
TINY_PEAK_MIB = 1024
MARGIN = 1.2                # requested memory = peak x MARGIN

KILL_ENV = "QUANTDREAM_TEST_KILL_AFTER_CHECKPOINT"   # tests only: that job's first attempt dies after a checkpoint


@dataclass
class Job:
    name: str
    method: str
    subject: Path
    cfg: Any                  # train.RunConfig (out = OUT/runs/<name>)
    num_cpus: int
    memory_mib: int
    kill_after_checkpoint: bool = False


@dataclass
class BatchSettings:
    address: str | None = None        # an existing Ray cluster; None: start a local one
    num_cpus: int = 0                 # local cluster size (0: every core of the machine)
    retries: int = 2                  # attempts after a worker dies
    callback: Callable[[dict], None] | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- jobs file
def _as_list(v, where: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where}: set must be a KEY=VALUE string or a list of them")
    return v


def read_jobs(path: str | Path, out: str | Path) -> list[Job]:
    """Parse and check JOBS.toml; every job's settings are validated as `personalize` would. Writes nothing."""
    import tomllib

    from .data.subject import read_subject
    from .methods import METHODS, method_class, section_name
    from .methods.base import config_from_dict
    from .models.sample import slug
    from .train import _closest, _validate, check_model
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jobs file {str(path)!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    extra = sorted(set(doc) - {"defaults", "job"})
    if extra:
        raise ValueError(f"{path}: unknown table {extra[0]!r}; a jobs file has [defaults] and [[job]] entries")
    defaults = doc.get("defaults", {})
    entries = doc.get("job", [])
    if not isinstance(defaults, dict) or not isinstance(entries, list):
        raise ValueError(f"{path}: [defaults] must be a table and jobs [[job]] entries")
    if not entries:
        raise ValueError(f"{path}: no [[job]] entries")
    jobs: list[Job] = []
    names: dict[str, int] = {}
    for i, entry in enumerate(entries, 1):
        spec = {**defaults, **entry}
        where = f"{path}: job {i}"
        for k in spec:
            if k not in JOB_KEYS:
                raise ValueError(f"{where}: unknown key {k!r}{_closest(k, sorted(JOB_KEYS))}")
        for k in REQUIRED:
            if k not in spec:
                raise ValueError(f"{where}: missing key {k!r}")
        method = spec["method"]
        if method not in METHODS:
            raise ValueError(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        subject_dir = Path(spec["subject"])
        if not subject_dir.is_absolute():
            subject_dir = path.parent / subject_dir
        try:
            subject, _ = read_subject(subject_dir, spec.get("init_word"))
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:
            raise ValueError(f"{where}: {str(e).replace('--subject', 'subject').replace('--init-word', 'init_word')}")
        name = str(spec.get("name") or f"{subject_dir.resolve().name}-{method}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"{where}: name {name!r} must be letters, digits, '-' or '_' (it names a folder)")
        if name in names:
            raise ValueError(f"{where}: duplicate job name {name!r} (also job {names[name]}); give each a name")
        names[name] = i
        model = str(spec.get("model", "tiny"))
        if model != "tiny" and not Path(model).is_absolute() and (path.parent / model).exists():
            model = str(path.parent / model)
        check_model(model)
        init_word = spec.get("init_word") or subject["class_word"]
        token = spec.get("token") or f"<{slug(subject.get('name') or subject_dir.name, 40).replace('_', '-')}>"
        threads = int(spec.get("threads", 1))
        if threads < 1:
            raise ValueError(f"{where}: threads must be >= 1, got {threads}")
        cfg = _job_config(spec, method, subject_dir, init_word, token, model, threads, Path(out) / "runs" / name)
        try:
            section, _ = _validate(cfg)
            config_from_dict(method_class(method).config_class, section, section_name(method))
        except ValueError as e:
            raise ValueError(f"{where} ({name}): {e}") from None
        memory = int(spec.get("memory_mib") or estimate_memory_mib(method, model))
        jobs.append(Job(name=name, method=method, subject=subject_dir, cfg=cfg, num_cpus=threads,
                        memory_mib=memory, kill_after_checkpoint=os.environ.get(KILL_ENV) == name))
    return jobs


def _job_config(spec: dict, method: str, images: Path, init_word: str, token: str, model: str, threads: int,
                out: Path):
    """The job's RunConfig through personalize's own flag handling (as `compare` builds its runs)."""
    from .cli.personalize import FLAGS, config_from_args
    from .methods import method_class
    ns = argparse.Namespace(**{f: None for f in FLAGS})
    vars(ns).update(images=str(images), init_word=init_word, out=str(out), model=model, method=method,
                    seed=spec.get("seed"), device=spec.get("device"), steps=spec.get("steps"),
                    weights=spec.get("weights"), checkpoint_every=spec.get("checkpoint_every"), threads=threads,
                    assignments=_as_list(spec.get("set", []), "set"), config=None, lr=None,
                    token=token if method_class(method).kind == "token" else None)
    return config_from_args(ns)


def estimate_memory_mib(method: str, model: str) -> int:
    """Memory request of one job: the measured whole-process peak (SD-1.5 figures for any local model; set
    memory_mib for SD-2.x / SDXL) or the embedded model's estimate, times a margin."""
    peak = TINY_PEAK_MIB if model == "tiny" else SD15_PEAK_MIB.get(method, max(SD15_PEAK_MIB.values()))
    return int(peak * MARGIN)


# ----------------------------------------------------------------------------- one job (in a Ray worker)
def train_job(job: Job, attempts_dir: str) -> dict:
    """Train one job in this process; continue from its checkpoint if an earlier attempt left one.
    Runs inside a Ray worker; returns the job's report row (exceptions become a failed row, not a retry)."""
    from .train import personalize
    cfg, out = job.cfg, Path(job.cfg.out)
    t0 = time.perf_counter()
    row = {"job": job.name, "method": job.method, "subject": str(job.subject), "output": str(out)}
    log = Path(attempts_dir) / f"{job.name}.jsonl"
    if (out / "run.json").is_file():
        return {**row, **_summary_row(out), "status": "ok", "note": "finished earlier, kept"}
    cfg.resume = (out / "checkpoint.pt").is_file()
    if not cfg.resume and out.is_dir():
        shutil.rmtree(out)        # died before its first checkpoint: start again
    start = {"step": None}

    def watch(state: dict) -> None:
        if start["step"] is None:
            start["step"] = state["step"] - 1
            with log.open("a") as f:
                f.write(json.dumps({"pid": os.getpid(), "resumed_from": start["step"]}) + "\n")
        if job.kill_after_checkpoint and not cfg.resume and (out / "checkpoint.pt").is_file():
            os._exit(3)           # tests only: a worker dying mid-job

    try:
        result = personalize(cfg, progress=False, callback=watch)
    except Exception as e:  # a bad photo, a missing backend: the job fails, the batch goes on
        return {**row, "status": "failed", "note": f"{type(e).__name__}: {e}",
                "wall_seconds": round(time.perf_counter() - t0, 2)}
    if not result.completed:
        return {**row, "status": "interrupted", "steps": result.step}
    return {**row, **_summary_row(out), "status": "ok", "wall_seconds": round(time.perf_counter() - t0, 2)}


def _summary_row(out: Path) -> dict:
    s = json.loads((out / "run.json").read_text())
    peak = (s.get("peak_memory_training") or {}).get("vmhwm_mib")
    return {"steps": s["steps"], "seconds": s["seconds"], "peak_mib": peak, "weights": s.get("weights"),
            "outputs": s.get("outputs", [])}


# ----------------------------------------------------------------------------- the batch
def start_ray(settings: BatchSettings):
    try:
        import ray
    except ImportError:
        raise ValueError("quantdream batch needs Ray: pip install 'quantdream[batch]' (or pip install ray)") from None
    if ray.is_initialized():
        return ray, False
    if settings.address:
        ray.init(address=settings.address, log_to_driver=False)
    else:
        ray.init(num_cpus=settings.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
    return ray, True


def run_batch(jobs: list[Job], out: str | Path, settings: BatchSettings) -> dict:
    """Submit every job, gather the rows as they finish, write OUT/batch.json and OUT/batch.md."""
    from .checkpoint import atomic_json, atomic_write
    out = Path(out)
    ray, started = start_ray(settings)
    t0 = time.perf_counter()
    try:
        check_fits(jobs, ray.cluster_resources())
        (out / "attempts").mkdir(parents=True, exist_ok=True)
        task = ray.remote(train_job)   # workers are reused: imports are paid once per worker
        refs = {}
        for job in jobs:
            refs[task.options(num_cpus=job.num_cpus, memory=job.memory_mib * 2**20,
                              max_retries=settings.retries, retry_exceptions=False,
                              name=f"quantdream:{job.name}").remote(job, str(out / "attempts"))] = job
        rows = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            job = refs[done[0]]
            try:
                row = ray.get(done[0])
            except Exception as e:  # retries spent: the worker died every time
                row = {"job": job.name, "method": job.method, "subject": str(job.subject), "status": "failed",
                       "output": job.cfg.out, "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            row.update(_attempts(out / "attempts" / f"{job.name}.jsonl"), num_cpus=job.num_cpus,
                       memory_request_mib=job.memory_mib)
            rows[job.name] = row
            if settings.callback:
                settings.callback(row)
        resources = ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
    report = {"rows": [rows[j.name] for j in jobs], "wall_seconds": round(time.perf_counter() - t0, 2),
              "cluster": {"address": settings.address or "local", "cpus": resources.get("CPU"),
                          "memory_mib": round(resources.get("memory", 0) / 2**20)},
              "retries": settings.retries, "notes": settings.notes}
    atomic_json(out / "batch.json", report)
    atomic_write(out / "batch.md", lambda tmp: Path(tmp).write_text(batch_markdown(report)))
    return report


def check_fits(jobs: list[Job], resources: dict) -> None:
    """A request larger than the whole cluster would wait forever: refuse it with the numbers."""
    cpus, mib = resources.get("CPU", 0), resources.get("memory", 0) / 2**20
    for job in jobs:
        if job.num_cpus > cpus or job.memory_mib > mib:
            raise ValueError(f"job {job.name!r} asks for {job.num_cpus} CPUs and {job.memory_mib} MiB but the Ray "
                             f"cluster has {cpus:.0f} CPUs and {mib:.0f} MiB; lower its threads / memory_mib "
                             f"or use a larger cluster")


def _attempts(log: Path) -> dict:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    return {"attempts": len(lines), "resumed_from": [x["resumed_from"] for x in lines]}


def batch_markdown(report: dict) -> str:
    def cell(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)
    lines = ["# quantdream batch", "",
             f"{len(report['rows'])} jobs in {report['wall_seconds']:.1f} s on {report['cluster']['address']} Ray "
             f"({cell(report['cluster']['cpus'], '{:.0f}')} CPUs)", "",
             "| job | method | status | steps | seconds | peak MiB | attempts | output |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        status = r["status"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['job']} | {r['method']} | {status} | {cell(r.get('steps'))} | "
                     f"{cell(r.get('seconds'), '{:.1f}')} | {cell(r.get('peak_mib'), '{:.0f}')} | "
                     f"{r.get('attempts', '-')} | {r['output']} |")
    lines += [""] + [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"
