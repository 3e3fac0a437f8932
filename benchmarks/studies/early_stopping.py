"""Early stopping on a held-out loss for ZOODiP (beyond the paper). Prints one JSON object.

    python benchmarks/studies/early_stopping.py --subjects teal_bag,olive_coat,mustard_boot --threads 1

Can ZOODiP stop before its last step without losing subject fidelity? ZOODiP's world CLIP-I stops rising after
~500-1000 of its 1,500 steps on the embedded model (docs/personalization.md), so a rule that notices the
plateau would save passes. Each subject gets one ``personalize --method zoodip`` run (its embedded defaults)
whose callback, every --every steps, scores the current token on a held-out loss: the denoising loss of the
training objective (same timestep range) on --draws fixed draws of (photo, flip, caption, t, noise) from a
generator the training never uses, identical at every evaluation, so two evaluations differ only by the
token. Those UNet passes are counted in the run's forward passes. The run goes to the end and keeps a
snapshot per evaluation; the rules below are then replayed on the recorded curve:

    patience P:  stop at the first evaluation that is the P-th in a row without a new best held-out loss,
                 and return the best token so far.

The returned token of the --patience rule and the final token are scored with ``quantdream evaluate``'s
protocol (the same as benchmarks/personalization.py). The bar it answers: the improved variant reaches
ZOODiP's final world CLIP-I with <= 1/3 of its UNet forward passes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from personalization import METRICS, add_harness_args, eval_settings, evaluate, mean, subject_dirs, train  # noqa: E402


def held_out_loss(method, data, placeholder, draws: int, seed: int) -> float:
    """Mean training-objective loss of the method's current token on ``draws`` fixed draws."""
    import torch
    obj = method.objective
    g = torch.Generator(device=obj.device).manual_seed(seed)
    with torch.no_grad():
        losses = [obj(method.theta, data.sample(1, g, placeholder.text), g) for _ in range(draws)]
    return float(torch.cat(losses).mean())


def replay(curve: list[tuple[int, float]], patience: int, last_step: int) -> dict:
    """The patience rule on a recorded [(step, held-out loss)] curve -> where it stops and what it returns."""
    best_step, best, since = curve[0][0], curve[0][1], 0
    for step, loss in curve[1:]:
        if loss < best:
            best_step, best, since = step, loss, 0
        else:
            since += 1
            if since >= patience:
                return {"stop_step": step, "best_step": best_step, "evaluations": curve.index((step, loss)) + 1}
    return {"stop_step": last_step, "best_step": best_step, "evaluations": len(curve)}


def run_subject(subject: Path, out: Path, a) -> dict:
    from quantdream.train import EMBEDDED_DEFAULTS
    steps = a.steps or EMBEDDED_DEFAULTS["zoodip"]["steps"]
    run = out / "run"
    curve_file = out / "curve.json"
    if not (run / "run.json").is_file() or not curve_file.is_file():
        shutil.rmtree(run, ignore_errors=True)          # the curve lives in this process: start over
        curve: list[tuple[int, float]] = []

        def callback(info: dict) -> None:
            if info["step"] == 1 or info["step"] % a.every == 0:
                # step 1 stands for the start (one step from the init word), so P counts from there
                curve.append((info["step"], held_out_loss(info["method"], info["data"], info["placeholder"],
                                                          a.draws, a.seed + 7919)))
        train(subject, "zoodip", "zoodip", {}, steps, run, a.seed, a.threads, a.model,
              extra={"checkpoint_every": a.every}, callback=callback)
        curve_file.write_text(json.dumps(curve))
    curve = [tuple(c) for c in json.loads(curve_file.read_text())]
    info = json.loads((run / "run.json").read_text())
    rules = {p: replay(curve, p, info["steps"]) for p in sorted({1, 2, 3, 5, a.patience})}
    chosen = rules[a.patience]
    # pseudo-runs for the evaluation: the returned snapshot and the final token
    runs = {"final": run}
    snap = run / "snapshots" / f"step_{chosen['best_step']:06d}.safetensors"
    if chosen["best_step"] != info["steps"] and snap.is_file():
        d = out / f"step_{chosen['best_step']}"
        d.mkdir(exist_ok=True)
        for f in ("run.json", "config.toml"):
            shutil.copy(run / f, d / f)
        shutil.copy(snap, d / "learned_embeds.safetensors")
        runs["early"] = d
    m = evaluate(runs, out / "eval", eval_settings(a), a.evaluator)
    by_dir = {str(p): v for v, p in runs.items()}
    scores = {by_dir.get(r["run_dir"], "floor"): {k: r["metrics"].get(k) for k in METRICS} for r in m["rows"]}
    if chosen["best_step"] == 1:                          # nothing beat the first evaluation: ~ the init word
        scores["early"] = scores["floor"]
    scores.setdefault("early", scores["final"])          # the rule ran to the end: the final token
    per_step = info["method_config"]["n"] + 1              # forward RGE: n + 1 UNet passes a step
    train_passes = per_step * steps
    for p, r in rules.items():
        r["passes"] = per_step * r["stop_step"] + a.draws * r["evaluations"]
        r["passes_fraction"] = r["passes"] / train_passes
    return {"subject": subject.name, "curve": curve, "rules": rules, "scores": scores,
            "final_passes": train_passes, "recorded_passes": info.get("unet_forward_passes")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(ap, "out/bench_early_stopping")
    ap.add_argument("--steps", type=int, default=0, help="ZOODiP's steps (default: its embedded default)")
    ap.add_argument("--every", type=int, default=100, help="held-out evaluation (and snapshot) every N steps")
    ap.add_argument("--draws", type=int, default=16, help="fixed (photo, t, noise) draws of the held-out loss")
    ap.add_argument("--patience", type=int, default=3, help="the rule whose returned token is evaluated")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    subjects = subject_dirs(a)
    names = [d.name for d in subjects]
    rows = [run_subject(subject, Path(a.out).resolve() / subject.name, a) for subject in subjects]
    summary = {k: {v: mean([r["scores"][v][k] for r in rows]) for v in ("floor", "early", "final")} for k in METRICS}
    fr = [r["rules"][a.patience]["passes_fraction"] for r in rows]
    ratio = [r["scores"]["early"]["world_clip_i"] / r["scores"]["final"]["world_clip_i"] for r in rows
             if r["scores"]["final"]["world_clip_i"]]
    print(json.dumps({
        "subjects": names, "every": a.every, "draws": a.draws, "patience": a.patience, "seed": a.seed,
        "images_per_prompt": a.images_per_prompt, "means": summary,
        "passes_fraction_mean": mean(fr), "passes_fraction_max": max(fr) if fr else None,
        "bar": {"early_world_clip_i_ge_final": (summary["world_clip_i"]["early"] or 0) >= (summary["world_clip_i"]["final"] or 0),
                "passes_fraction_le_1/3": bool(fr) and max(fr) <= 1 / 3},
        "early_over_final_world_clip_i_per_subject": ratio,
        "per_subject": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
