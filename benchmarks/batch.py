"""Many jobs on Ray: 4 subjects x 2 methods (ti, zoodip-fast) on the embedded model, short runs, on a local
Ray with 2 CPUs (2 single-thread jobs at once) against the same batch with 1 CPU (one job after the other).
A third batch, on 2 workers again, checks failures: one job's worker is killed after its first checkpoint, Ray
starts it again, the new attempt continues from that checkpoint, and the batch completes (its wall time, with
the lost work and the new worker's start, is reported beside the speed-up, not in it).

    python benchmarks/batch.py --out out/bench_batch > benchmarks/results/<date>/batch.json

Prints one JSON object: speedup (sequential wall time / 2-worker wall time), per-job seconds of both
batches, and the kill/retry check.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SUBJECTS = ["teal_bag", "coral_top", "mustard_boot", "navy_pullover"]
METHODS = ["ti", "zoodip-fast"]


def jobs_toml(steps: int, checkpoint_every: int) -> str:
    lines = ["[defaults]", f"steps = {steps}", f"checkpoint_every = {checkpoint_every}", "threads = 1",
             'set = ["sample_steps=2", "sample_images=1"]', ""]
    for s in SUBJECTS:
        for m in METHODS:
            lines += ["[[job]]", f'subject = "{ROOT / "examples" / "subjects" / s}"', f'method = "{m}"', ""]
    return "\n".join(lines)


def run(jobs_file: Path, out: Path, cpus: int, kill: str | None) -> dict:
    from quantdream.batch import KILL_ENV, BatchSettings, read_jobs, run_batch
    if out.exists():
        shutil.rmtree(out)
    os.environ.pop(KILL_ENV, None)
    if kill:
        os.environ[KILL_ENV] = kill
    jobs = read_jobs(jobs_file, out)
    t0 = time.perf_counter()
    report = run_batch(jobs, out, BatchSettings(num_cpus=cpus, retries=2))
    report["driver_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench_batch")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=100)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs_file = out / "jobs.toml"
    jobs_file.write_text(jobs_toml(a.steps, a.checkpoint_every))
    killed = f"{SUBJECTS[0]}-zoodip-fast"
    stdout = os.dup(1)
    os.dup2(2, 1)             # Ray's own messages (a worker died, a retry) go to stderr; stdout is the JSON
    try:
        parallel = run(jobs_file, out / "workers2", 2, None)
        sequential = run(jobs_file, out / "workers1", 1, None)
        failing = run(jobs_file, out / "workers2-kill", 2, killed)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)

    def per_job(rep: dict) -> dict:
        return {r["job"]: {"status": r["status"], "steps": r.get("steps"), "train_seconds": r.get("seconds"),
                           "attempt_wall_seconds": r.get("wall_seconds"), "attempts": r.get("attempts"),
                           "peak_mib": r.get("peak_mib")} for r in rep["rows"]}

    k = next(r for r in failing["rows"] if r["job"] == killed)
    others = [r for r in failing["rows"] if r["job"] != killed]
    result = {
        "benchmark": "batch", "jobs": len(parallel["rows"]), "subjects": SUBJECTS, "methods": METHODS,
        "steps": a.steps, "checkpoint_every": a.checkpoint_every, "threads_per_job": 1,
        "wall_seconds_2workers": parallel["wall_seconds"], "wall_seconds_sequential": sequential["wall_seconds"],
        "speedup": round(sequential["wall_seconds"] / parallel["wall_seconds"], 3),
        "all_ok": all(r["status"] == "ok" for r in parallel["rows"] + sequential["rows"] + failing["rows"]),
        "kill_retry": {"job": killed, "status": k["status"], "attempts": k.get("attempts"),
                       "wall_seconds_2workers_with_kill": failing["wall_seconds"],
                       "resumed_from": k.get("resumed_from"), "steps": k.get("steps"),
                       "resumed_from_checkpoint": k.get("resumed_from") == [0, a.checkpoint_every],
                       "other_jobs_single_attempt": all(r.get("attempts") == 1 for r in others)},
        "per_job_2workers": per_job(parallel), "per_job_sequential": per_job(sequential),
        "cpu_count": os.cpu_count(),
        "command": "python benchmarks/batch.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
