"""The job queue: each job is a separate process of the CLI, so a crashed job never takes the server down.

    personalize job   python -m quantdream.cli.main personalize --images photos --out out ...   (log.txt)
    generate job      python -m quantdream.cli.main generate PROMPTS --adapter out --out generations/<n>
    evaluate job      python -m quantdream.cli.main evaluate out --out eval ...   (subject fidelity for compare)
    (each runs in its run's folder, so the paths in its command and log are relative to it)

States: queued -> running -> done | stopped | failed; stop sends SIGINT (what Ctrl-C does: personalize saves
checkpoint.pt and exits 130), resume queues the same command with --resume (or from scratch when no checkpoint
was written yet). One job runs at a time by default (ServeConfig.max_jobs). Progress comes from what the job
writes: its tqdm line in log.txt (step, total, rate, smoothed loss), out/samples/*.png, out/run.json, and the
kernel's /proc/<pid>/status for its memory.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .store import TOKEN_METHODS, RequestError, Store, read_json

logger = logging.getLogger(__name__)

# tqdm's line for the training loop (unit="step"; train.PROGRESS_FORMAT, or tqdm's default with a remaining-time
# guess; tqdm sorts the postfix, so eta= comes before loss=); "Loading pipeline components" uses it/s and is skipped
PROGRESS = re.compile(r"(\d+)/(\d+) \[[^\]<,]*(?:<[^,\]]*)?,\s*(\?|[\d.]+)(step/s|s/step)(?:(?:, \w+=[^,\]]*)*?, loss=([-+\d.eE]+))?")
START = "== quantdream serve: start "
EVAL = "eval"            # the evaluation's job id (generations are 001, 002, ...)
ERROR = re.compile(r"^quantdream \w+: error: (.*)$")


def now() -> float:
    return round(time.time(), 3)


def package_root() -> str:
    """The folder that holds the quantdream package the server runs, first on the jobs' PYTHONPATH."""
    return str(Path(__file__).resolve().parents[2])


def pid_alive(pid: int | None, cwd: Path | None = None) -> bool:
    """A live (not zombie) process, working in ``cwd`` when given (a job runs in its run's folder: guards
    against a reused pid)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        here = Path(os.readlink(f"/proc/{pid}/cwd")) if cwd is not None else None
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and (cwd is None or here == cwd)


def proc_memory(pid: int | None) -> dict:
    """Resident and peak resident memory (MiB) of a running job, from /proc/<pid>/status."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key.lower() + "_mib"] = round(int(val.split()[0]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def parse_log(text: str) -> dict:
    """Step, total, rate and the loss curve from a job's log (every start appends to it)."""
    text = text.replace("\r", "\n")
    last_start = text.rfind(START)
    curve: dict[int, float] = {}
    step = total = None
    rate = None
    before = (None, None)        # where the previous start (before a resume) got to
    last_loss = None
    for m in PROGRESS.finditer(text):
        s, n, r, unit, loss = m.groups()
        if loss is not None and float(loss) != last_loss:   # tqdm shows the mean of 20 steps until the next one
            curve[int(s)] = last_loss = float(loss)
        if m.start() < last_start:
            before = (int(s), int(n))
        else:
            step, total = int(s), int(n)
            if r != "?":
                rate = float(r) if unit == "step/s" else 1.0 / max(float(r), 1e-9)
    error = None
    for line in reversed(text[max(last_start, 0):].splitlines()):
        m = ERROR.match(line.strip())
        if m:
            error = m.group(1)
            break
    return {"step": step, "steps": total, "steps_per_second": rate, "curve": sorted(curve.items()), "error": error,
            "step_before": before[0], "steps_before": before[1]}


def evaluation_metrics(path: Path) -> dict:
    """The mean metrics of `quantdream evaluate`'s metrics.json (world CLIP-I/T, EfficientNet, prompt accuracy)."""
    data = read_json(path) or {}
    means = data.get("means") or [{}]
    return {k: v for k, v in (means[0].get("metrics") or {}).items() if isinstance(v, (int, float))}


def last_lines(path: Path, n: int = 40, max_bytes: int = 65536) -> str:
    """The end of a log, progress bars collapsed to their last state."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [seg.split("\r")[-1] for seg in text.split("\n")]
    return "\n".join(l for l in lines[-n:])


class Queue:
    """Starts queued jobs (oldest first, at most ``max_jobs`` at once), watches them, records how they end."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cfg = store.cfg
        self.procs: dict[tuple[str, str], subprocess.Popen | int] = {}   # (run id, generation id or "") -> process
        self.stopping: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self.recover()

    # ------------------------------------------------------------------ lifecycle
    def start(self, interval: float = 0.5) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(interval,), name="quantdream-queue", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop watching; the jobs themselves keep running and a restarted server adopts them."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self, interval: float) -> None:
        while not self._halt.is_set():
            try:
                self.tick()
            except Exception:   # the watcher must outlive any one bad record
                logger.exception("queue tick failed")
            self._halt.wait(interval)

    def recover(self) -> None:
        """After a restart: adopt jobs still running (by pid), settle the ones that ended meanwhile."""
        for rec in self.store.all():
            for job, key in self._jobs_of(rec):
                if job["state"] in ("running", "stopping"):
                    if pid_alive(job.get("pid"), self.store.run_dir(rec["id"])):
                        self.procs[key] = job["pid"]
                        if job["state"] == "stopping":
                            self.stopping.add(key)
                    else:
                        self._finish(rec, job, key, None)
        for rec in self.store.all():
            self.store.save(rec)

    def _jobs_of(self, rec: dict):
        yield rec, (rec["id"], "")
        for g in rec.get("generations", []):
            yield g, (rec["id"], g["id"])
        if rec.get("evaluation"):
            yield rec["evaluation"], (rec["id"], EVAL)

    def _job(self, rec: dict, sub: str) -> dict:
        return rec if not sub else rec["evaluation"] if sub == EVAL else self._gen(rec, sub)

    def _folder(self, rec: dict, sub: str) -> Path:
        """Where a job writes its log: the run folder, eval/ or generations/<n>/."""
        d = self.store.run_dir(rec["id"])
        return d if not sub else d / EVAL if sub == EVAL else d / "generations" / sub

    # ------------------------------------------------------------------ the loop
    def tick(self) -> None:
        with self.store.lock:
            for key, proc in list(self.procs.items()):
                rc = proc.poll() if isinstance(proc, subprocess.Popen) else (
                    None if pid_alive(proc) else "unknown")
                if rc is None:
                    continue
                rec = self.store.runs.get(key[0])
                del self.procs[key]
                if rec is None:
                    continue
                job = self._job(rec, key[1])
                self._finish(rec, job, key, None if rc == "unknown" else rc)
                self.store.save(rec)
            queued = sorted(((job["queued_at"], rec["id"], key) for rec in self.store.runs.values()
                             for job, key in self._jobs_of(rec) if job["state"] == "queued"))
            for _, rid, key in queued:
                if len(self.procs) >= max(1, self.cfg.max_jobs):
                    break
                rec = self.store.runs[rid]
                if not key[1] and any(k[0] == rid for k in self.procs):
                    continue       # a run does not train while one of its generations runs
                self._launch(rec, key)

    def running(self) -> list[tuple[str, str]]:
        return list(self.procs)

    # ------------------------------------------------------------------ commands
    def personalize_command(self, rec: dict, resume: bool) -> list[str]:
        p = rec["params"]
        cmd = [self.cfg.python or sys.executable, "-m", "quantdream.cli.main", "personalize",
               "--images", "photos", "--init-word", p["init_word"], "--out", "out",
               "--model", rec["model_path"], "--method", p["method"], "--weights", p["weights"],
               "--seed", str(p["seed"]), "--sample-every", str(p["sample_every"]),
               "--checkpoint-every", str(p["checkpoint_every"]),
               "--set", f"sample_images={p['sample_images']}", "--set", f"sample_steps={p['sample_steps']}"]
        if p.get("token"):
            cmd += ["--token", p["token"]]
        if p.get("steps"):
            cmd += ["--steps", str(p["steps"])]
        if p["method"] in TOKEN_METHODS:
            cmd += ["--export-a1111"]
        if self.cfg.threads:
            cmd += ["--threads", str(self.cfg.threads)]
        return cmd + (["--resume"] if resume else [])

    def generate_command(self, rec: dict, gen: dict) -> list[str]:
        cmd = [self.cfg.python or sys.executable, "-m", "quantdream.cli.main", "generate", *gen["prompts"],
               "--model", rec["model_path"], "--adapter", "out", "-n", str(gen["num_images"]),
               "--seed", str(gen["seed"]), "--out", f"generations/{gen['id']}"]
        if gen.get("steps"):
            cmd += ["--steps", str(gen["steps"])]
        return cmd

    def evaluate_command(self, rec: dict) -> list[str]:
        """`quantdream evaluate` at a cheaper cut than the benchmarks (context and property prompts, 2 images each);
        the subject is photos/subject.json (the example subjects have one; uploads do not, and the page says so)."""
        return [self.cfg.python or sys.executable, "-m", "quantdream.cli.main", "evaluate", "out", "--out", EVAL,
                "--prompts", "context,property", "--images-per-prompt", "2", "--overwrite"]

    def _launch(self, rec: dict, key: tuple[str, str]) -> None:
        d = self.store.run_dir(rec["id"])
        log = self._folder(rec, key[1]) / "log.txt"
        if key[1] == EVAL:
            job, cmd = rec["evaluation"], self.evaluate_command(rec)
        elif key[1]:
            job = self._gen(rec, key[1])
            cmd = self.generate_command(rec, job)
        else:
            job = rec
            resume = (d / "out" / "checkpoint.pt").is_file()
            if not resume and (d / "out").exists():
                shutil.rmtree(d / "out")     # stopped before its first checkpoint: start again from scratch
            cmd = self.personalize_command(rec, resume)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([package_root()] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n{START}{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd[1:])}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=d, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        self.procs[key] = proc
        job.update(state="running", pid=proc.pid, started=now(), ended=None, returncode=None, error=None)
        job["starts"] = job.get("starts", 0) + 1
        self.store.save(rec)

    def _finish(self, rec: dict, job: dict, key: tuple[str, str], rc: int | None) -> None:
        """Record how a job ended: done (exit 0 and its result file), stopped (exit 130 after Ctrl-C/stop),
        failed (anything else; the error line or the signal that killed it, and the log stays)."""
        gen = key[1] not in ("", EVAL)
        folder = self._folder(rec, key[1])
        log = folder / "log.txt"
        text = log.read_text(errors="replace") if log.is_file() else ""
        parsed = parse_log(text)
        result = folder / {"": "out/run.json", EVAL: "metrics.json"}.get(key[1], "grid.png")
        fresh = result.is_file() and result.stat().st_mtime >= (job.get("started") or 0) - 1
        tail = text[text.rfind(START):] if START in text else text
        if rc == 0 and fresh or rc is None and fresh:
            state, error = "done", None
        elif rc == 130 or rc is None and "interrupted at step" in tail or key in self.stopping and rc in (
                -signal.SIGINT, -signal.SIGTERM):
            state, error = "stopped", None
        else:
            state = "failed"
            if rc is not None and rc < 0:
                error = f"the job was killed by signal {-rc} ({signal.Signals(-rc).name}); its log is below"
            elif parsed["error"]:
                error = parsed["error"]
            elif rc is None:
                error = "the job ended while the server was not running (exit status unknown); its log is below"
            else:
                lines = [l for l in tail.replace("\r", "\n").splitlines() if l.strip()]
                error = f"exit status {rc}: {lines[-1].strip() if lines else 'no output'}"
        self.stopping.discard(key)
        job.update(state=state, ended=now(), returncode=rc, error=error, pid=None)
        if gen and state == "done":
            job["images"] = sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")
        if key[1] == EVAL and state == "done":
            job["metrics"] = evaluation_metrics(folder / "metrics.json")

    # ------------------------------------------------------------------ user actions
    def stop(self, run_id: str, gen_id: str = "") -> dict:
        """Queued: taken off the queue. Running: SIGINT, like Ctrl-C (personalize saves a checkpoint)."""
        with self.store.lock:
            rec = self.store.get(run_id)
            job = self._job(rec, gen_id)
            key = (run_id, gen_id)
            if job["state"] == "queued":
                job.update(state="stopped", ended=now())
            elif job["state"] in ("running", "stopping") and key in self.procs:
                proc = self.procs[key]
                pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
                self.stopping.add(key)
                job["state"] = "stopping"
            else:
                raise RequestError(f"cannot stop a {job['state']} job", 409)
            self.store.save(rec)
            return job

    def resume(self, run_id: str) -> dict:
        """Queue a stopped or failed run again; it continues from out/checkpoint.pt when there is one."""
        with self.store.lock:
            rec = self.store.get(run_id)
            if rec["state"] not in ("stopped", "failed"):
                raise RequestError(f"only a stopped or failed run can be resumed (this one is {rec['state']})", 409)
            rec.update(state="queued", queued_at=now(), error=None)
            self.store.save(rec)
            return rec

    def submit(self, rec: dict) -> dict:
        rec.update(state="queued", queued_at=now())
        return self.store.add(rec)

    def submit_generation(self, rec: dict, gen: dict) -> dict:
        with self.store.lock:
            gen.update(state="queued", queued_at=now(), created=now(), images=[])
            (self.store.run_dir(rec["id"]) / "generations" / gen["id"]).mkdir(parents=True, exist_ok=True)
            rec["generations"].append(gen)
            self.store.save(rec)
            return gen

    def submit_evaluation(self, rec: dict) -> dict:
        with self.store.lock:
            if rec.get("evaluation", {}).get("state") in ("queued", "running", "stopping"):
                raise RequestError("this run is being evaluated already", 409)
            rec["evaluation"] = {"id": EVAL, "state": "queued", "queued_at": now(), "created": now()}
            (self.store.run_dir(rec["id"]) / EVAL).mkdir(exist_ok=True)
            self.store.save(rec)
            return rec["evaluation"]

    def _gen(self, rec: dict, gen_id: str) -> dict:
        for g in rec["generations"]:
            if g["id"] == gen_id:
                return g
        raise RequestError(f"no generation {gen_id!r}", 404)

    # ------------------------------------------------------------------ what the pages show
    def progress(self, rec: dict) -> dict:
        d = self.store.run_dir(rec["id"])
        log = d / "log.txt"
        parsed = parse_log(log.read_text(errors="replace")) if log.is_file() else parse_log("")
        run_json = read_json(d / "out" / "run.json") if rec["state"] == "done" else None
        losses = read_json(d / "out" / "losses.json") if run_json else None
        if isinstance(losses, list) and losses:    # the finished curve: means of 20 steps, as the live one
            curve = [(min(i + 20, len(losses)), sum(losses[i:i + 20]) / len(losses[i:i + 20]))
                     for i in range(0, len(losses), 20)]
        else:
            curve = parsed["curve"]
        steps = parsed["steps"] or parsed["steps_before"] or (run_json or {}).get("steps") or \
            rec["params"].get("steps") or None
        step = parsed["step"] if parsed["step"] is not None else (run_json or {}).get("steps") or \
            parsed["step_before"] or 0
        rate = parsed["steps_per_second"]
        eta = (steps - step) / rate if rec["state"] == "running" and rate and steps and parsed["step"] is not None \
            else None
        key = (rec["id"], "")
        proc = self.procs.get(key)
        pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
        samples = sorted(p.name for p in (d / "out" / "samples").glob("step_*.png"))
        phase = None
        if rec["state"] == "running":
            phase = "training" if parsed["step"] is not None else "loading the model and encoding the photos"
        return {"step": step or 0, "steps": steps, "steps_per_second": rate, "eta_seconds": eta,
                "loss": curve[-1][1] if curve else None, "curve": curve, "samples": samples, "phase": phase,
                "memory": proc_memory(pid) if pid else {}, "checkpoint": (d / "out" / "checkpoint.pt").is_file(),
                "run": run_json}
