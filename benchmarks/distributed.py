"""ZOODiP across processes and the time plan, on the embedded model. Prints one JSON object.

    python benchmarks/distributed.py                          # about 12 minutes on 2 free cores
    python benchmarks/distributed.py --steps 50 --eta-steps 200 --out out/bench_distributed

Every run is ``quantdream personalize`` on examples/subjects/teal_bag, int8 weights, 1 thread per process,
no sample grids, in a fresh subprocess:

    bit_identical   the token after --steps steps from 2 local gloo ranks (--nproc 2) against one process with
                    the same candidate shards (--set candidate_shards=2), for zoodip, zoodip-fast and gf-ti;
                    also how far one process with one batch of all candidates ends (max |difference|)
    speedup_2ranks  zoodip (n = 8: 9 candidates a step) training seconds, 1 process x 1 thread / 2 ranks x 1 thread:
                    the median of --repeats pairs of --speed-steps runs, the two runs of a pair back to back (one
                    pair is at the mercy of a neighbour's burst on a shared machine: every pair is in the JSON)
    bytes_per_step  what a rank sends a step: its share of the losses (all-gather) + the Ctrl-C flag
    eta_error       the time plan's training ETA against the measured training time of an --eta-steps run,
                    (plan - actual) / actual

Training seconds are run.json's ``seconds`` (the step loop, checkpoints included, setup and grids not).
On a machine shared with other work, speedups and ETA errors move with the load: rerun on idle cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = ROOT / "examples" / "subjects" / "teal_bag"


def personalize(out: Path, method: str, steps: int, *extra: str) -> dict:
    """One run in a fresh subprocess; returns its run.json plus the token."""
    from safetensors.torch import load_file
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "quantdream", "personalize", "--images", str(SUBJECT), "--token", "<teal-bag>",
           "--init-word", "bag", "--method", method, "--steps", str(steps), "--threads", "1", "--out", str(out),
           "--checkpoint-every", str(max(1, steps // 2)), "--set", "sample_images=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep +
           os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    run["wall_seconds"] = time.perf_counter() - t0
    run["token"] = load_file(out / "learned_embeds.safetensors")["<teal-bag>"]
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="steps of the bit-identity and speed runs (default 50)")
    ap.add_argument("--gfti-steps", type=int, default=20, help="gf-ti's steps (20 candidates a step; default 20)")
    ap.add_argument("--eta-steps", type=int, default=200, help="steps of the ETA run (default 200)")
    ap.add_argument("--speed-steps", type=int, default=100, help="steps of each speed-up run (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of speed-up runs; the median counts (default 3)")
    ap.add_argument("--out", default="out/bench_distributed")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    result: dict = {"bit_identical": {}, "one_batch_max_abs_difference": {}, "runs": {}}
    for method, steps in (("zoodip", a.steps), ("zoodip-fast", a.steps), ("gf-ti", a.gfti_steps)):
        two = personalize(out / f"{method}-2ranks", method, steps, "--nproc", "2")
        shards = personalize(out / f"{method}-1proc-2shards", method, steps, "--set", "candidate_shards=2")
        one = personalize(out / f"{method}-1proc", method, steps)
        result["bit_identical"][method] = bool(torch.equal(two["token"], shards["token"]))
        result["one_batch_max_abs_difference"][method] = float((two["token"] - one["token"]).abs().max())
        for name, r in (("2ranks", two), ("1proc_2shards", shards), ("1proc", one)):
            result["runs"][f"{method}/{name}"] = {"steps": r["steps"], "seconds": r["seconds"],
                                                  "wall_seconds": round(r["wall_seconds"], 1),
                                                  "unet_forward_passes": r["unet_forward_passes"],
                                                  "bytes_per_step": r.get("bytes_per_step")}
        if method == "zoodip":
            result["bytes_per_step"] = two["bytes_per_step"]
    pairs = []
    for i in range(a.repeats):
        one = personalize(out / "zoodip-speed-1proc", "zoodip", a.speed_steps)
        two = personalize(out / "zoodip-speed-2ranks", "zoodip", a.speed_steps, "--nproc", "2")
        pairs.append({"1proc_seconds": one["seconds"], "2ranks_seconds": two["seconds"],
                      "speedup": round(one["seconds"] / two["seconds"], 3)})
    result["speedup_2ranks"] = statistics.median(p["speedup"] for p in pairs)
    result["speedup_pairs"] = pairs
    eta = personalize(out / "zoodip-eta", "zoodip", a.eta_steps)
    plan = eta["plan"]
    result["eta_error"] = round((plan["training_seconds"] - eta["seconds"]) / eta["seconds"], 4)
    result["eta_run"] = {"steps": a.eta_steps, "plan_seconds_per_step": plan["seconds_per_step"],
                         "plan_training_seconds": round(plan["training_seconds"], 2),
                         "actual_seconds": eta["seconds"]}
    result["settings"] = {"model": "tiny (embedded), int8", "subject": "teal_bag", "threads_per_process": 1,
                          "steps": a.steps, "gfti_steps": a.gfti_steps, "speed_steps": a.speed_steps,
                          "repeats": a.repeats, "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "command": "python benchmarks/distributed.py " +
                          " ".join(sys.argv[1:])}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
