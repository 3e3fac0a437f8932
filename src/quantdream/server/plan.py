"""The time plan and memory estimate the new-run page shows before a run starts.

    estimate(method, model_kind, steps, history) -> {"steps", "setup_seconds", "seconds_per_step", "total_seconds",
                                                     "memory_mib", "basis"}

Best basis first: finished runs of the same method on the same model in this data folder (their run.json), else
the measured tables below. Nothing here imports torch: the method defaults are read from train.py's source.
"""
from __future__ import annotations

import ast
import functools
import statistics
from pathlib import Path

# The embedded model (64 px), one thread on a shared 2-core machine, 20 steps, no sample grids:
# `quantdream personalize --images examples/subjects/teal_bag --method M --steps 20 --threads 1
#  --set sample_images=0` (training seconds per step, setup seconds, whole-process peak VmHWM MiB).
EMBEDDED = {
    "zoodip": (0.68, 13.3, 588), "zoodip-fast": (0.24, 17.4, 596), "ti": (0.23, 18.6, 607),
}
# The SD-1.5 architecture (random weights, 512 px, 2 CPU threads, no low-memory mode):
# benchmarks/results/comparison_memory-sd15-2026-11-23.json (seconds per step, setup seconds, whole-process peak MiB).
# zoodip-fast uses ZOODiP's n = 2 on SD folders, so it gets ZOODiP's row.
SD15 = {
    "zoodip": (33.5, 59.7, 2095), "zoodip-fast": (33.5, 59.7, 2095), "ti": (30.6, 60, 6374),
    "gf-ti": (235.6, 60, 2470), "dreambooth": (63.6, 60, 16677), "lora": (29.1, 60, 7182),
    "qlora": (37.8, 60, 4122), "peqa": (41.5, 60, 4000), "tuneqdm": (48.8, 60, 4179),
    "tuneqdm-s1": (45.3, 60, 4028), "tuneqdm-s2": (46.0, 60, 4003),
}


@functools.lru_cache(maxsize=1)
def default_steps() -> dict[str, dict[str, int]]:
    """{"embedded": {method: steps}, "sd": {...}} from train.py's EMBEDDED_DEFAULTS / SD_DEFAULTS, without
    importing it (it imports torch)."""
    src = (Path(__file__).resolve().parents[1] / "train.py").read_text()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("EMBEDDED_DEFAULTS", "SD_DEFAULTS"):
                table = ast.literal_eval(node.value)
                out["embedded" if name == "EMBEDDED_DEFAULTS" else "sd"] = {m: v["steps"] for m, v in table.items()}
    return out


def estimate(method: str, model_kind: str, steps: int = 0, history: list[dict] | None = None) -> dict:
    """Seconds and peak memory of a run; ``history``: run.json summaries of finished runs on the same model."""
    kind = "embedded" if model_kind == "embedded" else "sd"
    steps = steps or default_steps().get(kind, {}).get(method, 0)
    same = [h for h in history or [] if h.get("method") == method and h.get("seconds_per_step")]
    if same:
        sps = statistics.median(h["seconds_per_step"] for h in same)
        setup = statistics.median(h.get("setup_seconds", 0) for h in same)
        mem = max((h.get("peak_memory_training") or {}).get("vmhwm_mib", 0) for h in same) or None
        basis = f"median of {len(same)} finished {method} run{'s' if len(same) > 1 else ''} on this model here"
    else:
        row = (EMBEDDED if kind == "embedded" else SD15).get(method)
        if row is None:
            return {"steps": steps, "setup_seconds": None, "seconds_per_step": None, "total_seconds": None,
                    "memory_mib": None, "basis": f"no measurement of {method} on this model yet: the plan appears "
                                                 f"once one run has finished"}
        sps, setup, mem = row
        basis = ("measured on the embedded model, 1 thread of a shared 2-core machine" if kind == "embedded" else
                 "measured on the SD-1.5 architecture at 512 px, 2 CPU threads (a GPU is far faster)")
    return {"steps": steps, "setup_seconds": round(setup, 1), "seconds_per_step": round(sps, 4),
            "total_seconds": round(setup + sps * steps, 1), "memory_mib": round(mem) if mem else None, "basis": basis}
