"""TuneQDM's open choices on the embedded model. Prints one JSON object.

    python benchmarks/studies/tuneqdm_study.py --study interval              # S1's timestep interval (default study)
    python benchmarks/studies/tuneqdm_study.py --study experts               # TuneQDM's number of timestep experts N
    python benchmarks/studies/tuneqdm_study.py --study mcsu                  # input scales at their own rate (beyond the paper)
    python benchmarks/studies/tuneqdm_study.py --subjects teal_bag,olive_coat   # a subset; rerun to resume

interval: S1 trains one PEQA scale set that is used only for t in [t_low, t_high) (frozen quantizer scales
elsewhere). The rule quantdream ships is [500, 1000), the high-noise half (methods/tuneqdm.py says why); it
is trained beside [0, 500), [250, 750), [500, 900) and PEQA (the scales used at every t).

experts: ``tuneqdm`` (MCSU: output- and input-channel scales) with N = 1, 2, 4 timestep experts, beside
PEQA. TuneQDM's script uses N = 4 (the default here), the T-note's CIFAR-10 ablation found N = 2 best, and
the scale file grows with N (one output+input set per expert: 0.61 M values, 0.62 MB as int8 changes, on
SD-1.5).

mcsu (beyond the paper): at TuneQDM's one rate (3e-6) the input scales, which start at 1, barely move; here
they get their own rate (``--set tuneqdm.lr_in=3e-3``, the same relative step as the output scales) at N = 1
and N = 4, beside PEQA and the default (copy the experts study's runs/SUBJECT/{peqa,tuneqdm-n4} into this
study's --out to reuse them: a finished run with the same settings is kept).

Every variant is trained on each subject with the same seed and its method's step count, and scored with
``quantdream evaluate``'s protocol (world CLIP-I, EfficientNet, world CLIP-T, prompt accuracy), with the
class word alone as the floor. Runs and evaluations are kept under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from personalization import METRICS, add_harness_args, eval_settings, evaluate, mean, subject_dirs, train  # noqa: E402

INTERVALS = {"s1-high": (500, 1000), "s1-low": (0, 500), "s1-middle": (250, 750), "s1-puts": (500, 900)}
EXPERTS = {"tuneqdm-n1": 1, "tuneqdm-n2": 2, "tuneqdm-n4": 4}
LR_IN = 3e-3   # s_in's own rate: s_in starts at 1, s_out at ~1e-3, so lr 3e-6 moves both by ~0.3% per step
STUDIES = {   # variant -> (method, its settings section); the shipped choice of each study
    "interval": ({"peqa": ("peqa", {})} | {k: ("tuneqdm-s1", {"t_low": lo, "t_high": hi})
                                           for k, (lo, hi) in INTERVALS.items()}, "s1-high"),
    "experts": ({"peqa": ("peqa", {})} | {k: ("tuneqdm", {"num_experts": n}) for k, n in EXPERTS.items()},
                "tuneqdm-n4"),
    "mcsu": ({"peqa": ("peqa", {}), "tuneqdm-n4": ("tuneqdm", {"num_experts": 4})}
             | {f"tuneqdm-n{n}-lr-in": ("tuneqdm", {"num_experts": n, "lr_in": LR_IN}) for n in (1, 4)}, "tuneqdm-n4"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=sorted(STUDIES), default="interval")
    ap.add_argument("--steps", type=int, default=0, help="steps of every run (default: each method's embedded default)")
    add_harness_args(ap, None, "default out/bench_tuneqdm_<study>")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from quantdream.methods.peqa import SCALES_FILE
    from quantdream.train import EMBEDDED_DEFAULTS
    settings = eval_settings(a)
    table, shipped = STUDIES[a.study]
    subjects = subject_dirs(a)
    names = [d.name for d in subjects]
    out = Path(a.out or f"out/bench_tuneqdm_{a.study}").resolve()
    rows, sizes = [], {}
    for subject in subjects:
        name = subject.name
        runs = {v: train(subject, v, method, section, a.steps or EMBEDDED_DEFAULTS[method]["steps"],
                         out / "runs" / name / v, a.seed, a.threads, a.model)
                for v, (method, section) in table.items()}
        m = evaluate(runs, out / "eval" / name, settings, a.evaluator)
        by_dir = {str(p): v for v, p in runs.items()}
        rows += [{"variant": "floor" if r["run_dir"] is None else by_dir[r["run_dir"]], "subject": name,
                  **{k: r["metrics"].get(k) for k in METRICS}} for r in m["rows"]]   # evaluate keeps only these runs
        for v, p in runs.items():   # the embedded model's scale file (the SD-1.5 sizes come from bench memory)
            sizes.setdefault(v, []).append((p / SCALES_FILE).stat().st_size)
    variants = {v: {k: mean([r[k] for r in rows if r["variant"] == v]) for k in METRICS}
                | {"storage_bytes": mean(sizes.get(v, []))} for v in ["floor", *table]}
    for v, (method, section) in table.items():
        variants[v] |= {"method": method, **section}
    studied = [v for v in table if v != "peqa"]
    for v in studied:           # against PEQA (one output-scale set used at every t), TuneQDM's comparison
        for k in ("world_clip_i", "prompt_accuracy"):
            mine, peqa = variants[v][k], variants["peqa"][k]
            variants[v][f"{k}_minus_peqa"] = None if mine is None or peqa is None else mine - peqa
    best = max(studied, key=lambda v: (variants[v]["prompt_accuracy"] or 0) + (variants[v]["world_clip_i"] or 0))
    print(json.dumps({"study": a.study, "subjects": names, "seed": a.seed, "images_per_prompt": a.images_per_prompt,
                      "steps": {v: a.steps or EMBEDDED_DEFAULTS[method]["steps"] for v, (method, _) in table.items()},
                      "shipped": shipped, "best_by_prompt_accuracy_plus_clip_i": best,
                      "shipped_is_best": best == shipped,
                      "variants": variants, "per_subject": rows},
                     indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
