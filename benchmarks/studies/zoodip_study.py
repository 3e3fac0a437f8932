"""ZOODiP's hyperparameters on the embedded model: the paper's method, other settings. Prints one JSON object.

    python benchmarks/studies/zoodip_study.py --study sweep --subjects teal_bag,olive_coat,mustard_boot,coral_top \\
        --images-per-prompt 2                                   # PUTS interval, then SG's tau, n, ZO-Adam eps
    python benchmarks/studies/zoodip_study.py --study best \\
        --reference benchmarks/results/2026-11-24/personalization-10subjects.json   # the sweep's best, 10 subjects
    python benchmarks/studies/zoodip_study.py --study long --subjects teal_bag,olive_coat,mustard_boot,coral_top \
        --reference benchmarks/results/2026-11-24/personalization-10subjects-puts800.json   # 2x, 3x the steps
    python benchmarks/studies/zoodip_study.py --study lr --subjects teal_bag,olive_coat,mustard_boot,coral_top \
        --reference benchmarks/results/2026-11-24/personalization-10subjects-puts800.json   # the paper's lr 5e-3, longer
    python benchmarks/studies/zoodip_study.py --study oracle --subjects teal_bag,olive_coat,mustard_boot,coral_top \
        --reference benchmarks/results/2026-11-24/personalization-10subjects-puts800.json   # without direction noise
    python benchmarks/studies/zoodip_study.py --study mu --subjects teal_bag,olive_coat,mustard_boot,coral_top \
        --images-per-prompt 2                                   # the finite-difference step mu

sweep: textual inversion (the reference) and ZOODiP ("zoodip") with the paper's PUTS interval [500, 900) beside
[500, 1000), [600, 1000), [700, 1000), [800, 1000), [900, 1000) (the TuneQDM S1 study found the subject learned at the
highest-noise timesteps on this model); then, at [800, 1000), SG's buffer tau = 256 and 512 (tau > 128 lets SG
remove more of the 768 directions), n = 8 directions a step at ZOODiP's forward-pass budget (500 steps), and
ZO-Adam eps = 1e-4. Everything else is ZOODiP's embedded default (1500 steps, lr 1e-2), seed 0. The study
moved the embedded default to [800, 1000) (zoodip-t800 here); SD folders keep the paper's [500, 900).

best: the sweep's two best settings on every subject. With --reference (a personalization.py JSON made with the
same seed and protocol) the floor, ti and zoodip rows are taken from that file instead of being trained again
(the evaluation's seeds make every row independent of the others); ``--variants zoodip`` on a few subjects
checks that the reference's zoodip rows are reproduced.

long: the embedded default ([800, 1000), lr 1e-2) trained 2x, 3x and 6x as long (3,000, 4,500 and 9,000 steps); with
--reference (the personalization.py JSON at the same default) its 1,500-step rows are the reference's "zoodip". Does
ZOODiP keep learning past 1,500 steps at the new interval? (At the paper's [500, 900) it stopped rising after 500-1,000
steps.) zoodip-t800-4500-cosine: 4,500 steps with the step size decayed to 0.1 x (cosine; beyond the paper).

fast: zoodip-fast (16 vocabulary directions, 1/3 of ZOODiP's passes) at ZOODiP's embedded interval [800, 1000);
compare with personalization-10subjects-puts800.json's budget-vocab16 (made at the paper's [500, 900)). The study
moved zoodip-fast's embedded default to [800, 1000).

lr: the paper's step size 5e-3 (the embedded default is the reference script's 1e-2) at 4,500 and 9,000 steps, [800, 1000).
At 1e-2 ZOODiP peaked near 4,500 steps with its token moving ~3x as much across textual inversion's direction as
along it; a smaller step halves the movement per step, so 9,000 steps at 5e-3 go as far along as 4,500 at 1e-2 with,
if the across part is a random walk, 1/sqrt(2) of it. Compare with the long study's zoodip-t800-4500 (lr 1e-2).

oracle: how much of ZOODiP's gap to textual inversion is the estimator's direction noise. zoodip-t800-expected replaces
the RGE estimate by its expectation over the directions on the same batch (E_e[g] = grad L / sqrt((d_eff + n - 1) / n),
by backpropagation: a study oracle, not a forward-only method) with everything else ZOODiP's embedded default
(ZO-Adam, SG, PUTS [800, 1000), int8, 1,500 steps), so it is ZOODiP with n -> infinity directions; at 1,500 and 4,500
steps. zoodip-t800-n8-1500: the real estimator with n = 8 (a quarter of n = 2's direction variance) at 1,500 steps.

mu: the finite-difference step mu of Eq. 3 (1e-3 in the paper and the reference code) at 1e-4, 1e-2 and 1e-1,
beside the embedded default, everything else the default. The one ZOODiP setting no earlier study moved.

Every study but the oracle's n = 8 variant pins n = 2, the paper's value and the embedded default until the oracle
study moved it to 8: "the embedded default" above means [800, 1000), lr 1e-2, 1,500 steps at n = 2, which is what the
committed reference JSONs (personalization-10subjects-puts800.json) hold as "zoodip".

Runs and evaluations are kept under --out, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from personalization import (METRICS, PAPER_PUTS, add_harness_args, eval_settings, evaluate, mean,  # noqa: E402
                             subject_dirs, subject_rows, train)

N2 = {"n": 2}    # the paper's n: every study but "oracle" ran at it (the embedded default until the oracle study)
T800 = {"t_low": 800, "t_high": 1000, **N2}   # the embedded default after the sweep; "zoodip" here pins PAPER_PUTS
PAPER = {**PAPER_PUTS, **N2}
PUTS = {f"zoodip-t{lo}-{hi}": {"t_low": lo, "t_high": hi, **N2} for lo, hi in ((500, 1000), (600, 1000), (700, 1000),
                                                                                (800, 1000), (900, 1000))}
STUDIES = {   # variant -> (method, settings section, steps; 0 = the method's embedded default)
    "sweep": {"ti": ("ti", {}, 0), "zoodip": ("zoodip", PAPER, 0)}
    | {v: ("zoodip", s, 0) for v, s in PUTS.items()}
    | {"t800-tau256": ("zoodip", {**T800, "tau": 256}, 0), "t800-tau512": ("zoodip", {**T800, "tau": 512}, 0),
       "t800-n8": ("zoodip", {**T800, "n": 8}, 500),                 # 500 x (8 + 1) = ZOODiP's 4,500 passes
       "t800-eps1e-4": ("zoodip", {**T800, "adam_eps": 1e-4}, 0)},
    "best": {"zoodip": ("zoodip", PAPER, 0), "zoodip-t800": ("zoodip", T800, 0),
             "zoodip-t800-n8": ("zoodip", {**T800, "n": 8}, 500)},
    "long": {"zoodip-t800-3000": ("zoodip", T800, 3000), "zoodip-t800-4500": ("zoodip", T800, 4500),
             "zoodip-t800-9000": ("zoodip", T800, 9000),
             "zoodip-t800-4500-cosine": ("zoodip", {**T800, "schedule": "cosine"}, 4500)},
    "fast": {"zoodip-fast-t800": ("zoodip-fast", T800, 0)},         # zoodip-fast's 500 steps at ZOODiP's interval
    "lr": {"zoodip-t800-lr5e-3-4500": ("zoodip", {**T800, "lr": 5e-3}, 4500),
           "zoodip-t800-lr5e-3-9000": ("zoodip", {**T800, "lr": 5e-3}, 9000)},
    "oracle": {"zoodip-t800-expected": ("zoodip", {**T800, "estimator": "expected"}, 0),
               "zoodip-t800-expected-4500": ("zoodip", {**T800, "estimator": "expected"}, 4500),
               "zoodip-t800-n8-1500": ("zoodip", {**T800, "n": 8}, 1500)},
    "mu": {"zoodip-t800": ("zoodip", T800, 0)}
    | {f"zoodip-t800-mu{mu:.0e}".replace("e-0", "e-"): ("zoodip", {**T800, "mu": mu}, 0) for mu in (1e-4, 1e-2, 1e-1)},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=sorted(STUDIES), default="sweep")
    ap.add_argument("--variants", default="", help="comma-separated subset of the study's variants")
    ap.add_argument("--reference", default=None,
                    help="personalization.py JSON whose floor / ti / zoodip rows stand in for training them again")
    ap.add_argument("--steps", type=int, default=0, help="steps of every run (default: each variant's)")
    add_harness_args(ap, None, "default out/bench_zoodip_<study>")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from quantdream.train import EMBEDDED_DEFAULTS
    table = STUDIES[a.study]
    ref = None
    if a.reference:
        try:
            ref = json.loads(Path(a.reference).read_text())
            if not isinstance(ref, dict) or not isinstance(ref.get("per_subject"), list):
                raise ValueError("no per_subject rows")
        except (OSError, ValueError) as e:
            raise SystemExit(f"--reference {a.reference}: not a benchmarks/personalization.py JSON ({e})") from None
    chosen = [v for v in a.variants.split(",") if v] or [v for v in table if not (ref and v in ("ti", "zoodip"))]
    unknown = [v for v in chosen if v not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(table)}")
    settings = dataclasses.replace(eval_settings(a), baseline=ref is None)   # the reference has the floor
    subjects = subject_dirs(a)
    out = Path(a.out or f"out/bench_zoodip_{a.study}").resolve()
    rows = []
    for subject in subjects:
        name = subject.name
        runs = {v: train(subject, v, table[v][0], table[v][1],
                         a.steps or table[v][2] or EMBEDDED_DEFAULTS[table[v][0]]["steps"],
                         out / "runs" / name / v, a.seed, a.threads, a.model) for v in chosen}
        rows += subject_rows(name, runs, evaluate(runs, out / "eval" / name, settings, a.evaluator))
        if ref:
            rows += [{**r, "variant": f"reference {r['variant']}"} for r in ref["per_subject"]
                     if r["subject"] == name and (r["variant"] in ("ti", "zoodip") or r["variant"].startswith("floor"))]
    names = sorted({r["variant"] for r in rows} - set(chosen)) + chosen      # floor, reference rows, then the study's
    variants = {v: {k: mean([r.get(k) for r in rows if r["variant"] == v]) for k in METRICS + ("unet_forward_passes",)}
                for v in names}
    ti = variants.get("ti") or variants.get("reference ti")
    for v, row in variants.items():
        if v in table:
            row.update(method=table[v][0], settings=table[v][1])
        if ti and ti["world_clip_i"] and row["world_clip_i"] is not None:
            row["world_clip_i_ratio_to_ti"] = row["world_clip_i"] / ti["world_clip_i"]
    print(json.dumps({"study": a.study, "subjects": [d.name for d in subjects], "seed": a.seed,
                      "images_per_prompt": a.images_per_prompt, "reference": a.reference,
                      "variants": variants, "per_subject": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
