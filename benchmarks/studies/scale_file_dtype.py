"""Do the int8 and float16 scale files lose anything? (peqa, tuneqdm; the comparison's storage column.) One JSON object.

    python benchmarks/studies/scale_file_dtype.py --subjects teal_bag,olive_coat --threads 1

Scale files hold int8 changes from the quantizer's scales by default (quant/scales.py): a quarter of the bytes of
float32 scales (float16 changes: half). Each method is trained once per subject with ``file_dtype = float32``;
the same trained scales are then written again as float16 and as int8 changes, each into a copy of the run, and
every run is scored with ``quantdream evaluate``'s protocol (same seeds, so any difference comes from the
file). Output per method: the mean metrics of each file, their differences from float32, the file sizes, and
how far each copy's scales are from the float32 ones (``rounding``: sum |error| / sum |change from the start|, and
the share of scales whose error exceeds a tenth of their own change), over all subjects.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from personalization import (METRICS, add_harness_args, eval_settings, evaluate, mean, subject_dirs,  # noqa: E402
                             subject_rows, train)

METHODS = ("peqa", "tuneqdm")
COPIES = ("float16", "int8")       # file dtypes written from the float32 run's scales


def rewritten_copy(run: Path, out: Path, model: str, dtype: str) -> Path:
    """``run`` with its float32 scale file written again in ``dtype`` (the same trained scales)."""
    from quantdream.methods.adapters import apply_scales
    from quantdream.methods.peqa import SCALES_FILE, save_scale_file
    from quantdream.models.load import load_pipeline
    if (out / "run.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run, tmp, ignore=shutil.ignore_patterns("checkpoint.pt", "snapshots", "samples"))
    unet = load_pipeline(model).unet
    apply_scales(unet, run / SCALES_FILE)
    save_scale_file(unet, tmp / SCALES_FILE, dtype)
    tmp.rename(out)
    return out


def trained_scales(run: Path, model: str) -> dict:
    """``run``'s scales loaded into a fresh UNet (scales_state_dict), and where they started."""
    from quantdream.methods.adapters import apply_scales
    from quantdream.methods.peqa import SCALES_FILE
    from quantdream.models.load import load_pipeline
    from quantdream.quant.scales import _initial_scales, scales_state_dict
    unet = load_pipeline(model).unet
    apply_scales(unet, run / SCALES_FILE)
    return {"scales": scales_state_dict(unet), "start": _initial_scales(unet)}


def rounding(full: dict, copy: dict) -> dict:
    """How far ``copy``'s scales are from ``full``'s (both trained_scales()), relative to what training changed."""
    import torch
    want, got, start = full["scales"], copy["scales"], full["start"]
    change = torch.cat([(want[k] - start[k]).reshape(-1) for k in want]).abs()
    err = torch.cat([(got[k] - want[k]).reshape(-1) for k in want]).abs()
    return {"error": float(err.sum()), "change": float(change.sum()), "above": int((err > 0.1 * change).sum()),
            "values": change.numel()}


def rounding_summary(parts: list[dict]) -> dict:
    total = {k: sum(p[k] for p in parts) for k in parts[0]}
    return {"error_over_change": total["error"] / total["change"],
            "share_error_above_tenth_of_change": total["above"] / total["values"], "values": total["values"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(ap, "out/bench_scale_file_dtype")
    ap.add_argument("--steps", type=int, default=0, help="steps of every run (default: each method's)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from quantdream.methods.peqa import SCALES_FILE
    from quantdream.train import EMBEDDED_DEFAULTS
    out = Path(a.out).resolve()
    rows, sizes, errors = [], {}, {}
    for subject in subject_dirs(a):
        runs = {}
        for m in METHODS:
            full = train(subject, f"{m}-float32", m, {"file_dtype": "float32"},
                         a.steps or EMBEDDED_DEFAULTS[m]["steps"],
                         out / "runs" / subject.name / f"{m}-float32", a.seed, a.threads, a.model)
            runs[f"{m}-float32"] = full
            reference = trained_scales(full, a.model)
            for d in COPIES:
                runs[f"{m}-{d}"] = rewritten_copy(full, out / "runs" / subject.name / f"{m}-{d}", a.model, d)
                errors.setdefault(m, {}).setdefault(d, []).append(
                    rounding(reference, trained_scales(runs[f"{m}-{d}"], a.model)))
            sizes.setdefault(m, {d: (runs[f"{m}-{d}"] / SCALES_FILE).stat().st_size for d in ("float32", *COPIES)})
        settings = eval_settings(a)
        rows += subject_rows(subject.name, runs, evaluate(runs, out / "eval" / subject.name, settings, a.evaluator))
    result = {}
    for m in METHODS:
        means = {d: {k: mean([r[k] for r in rows if r["variant"] == f"{m}-{d}"]) for k in METRICS}
                 for d in ("float32", *COPIES)}
        by_subject = {(r["variant"], r["subject"]): r for r in rows}
        largest = {d: {k: max(abs(by_subject[f"{m}-{d}", s][k] - by_subject[f"{m}-float32", s][k])
                              for v, s in by_subject if v == f"{m}-float32") for k in METRICS} for d in COPIES}
        result[m] = {**means, "minus_float32": {d: {k: means[d][k] - means["float32"][k] for k in METRICS}
                                                for d in COPIES},
                     "largest_subject_difference": largest, "file_bytes": sizes[m],
                     "rounding": {d: rounding_summary(errors[m][d]) for d in COPIES}}
    print(json.dumps({"subjects": sorted({r["subject"] for r in rows}), "seed": a.seed,
                      "images_per_prompt": a.images_per_prompt, "methods": result, "per_subject": rows},
                     indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
