"""Bars of the personalization core on the embedded model. Prints one JSON object.

    python benchmarks/personalization.py                           # every example subject (hours on 2 cores)
    python benchmarks/personalization.py --subjects teal_bag,olive_coat --out out/bench_personalization
    python benchmarks/personalization.py ... --variants zoodip,ti  # a subset; rerun to resume
    python benchmarks/personalization.py --ray --threads 1         # the runs as Ray tasks, one core each

For each subject (same seeds for every variant): trains every variant below with ``quantdream personalize``,
then scores all of them, plus the init word with no personalization (the floor), with ``quantdream
evaluate``'s protocol (world CLIP-I / CLIP-T, subject attribute accuracy, EfficientNet-Lite0 similarity,
prompt accuracy); each subject's ceiling (its photos) and every variant's share of the floor-to-ceiling gap
in world CLIP-I and subject attribute accuracy are in ``ceiling`` and ``gap_closed``. Finished runs
and evaluations are kept under --out, so an interrupted benchmark continues where it stopped.

Variants:
    ti                      textual inversion, fp32 model, backpropagation (the gradient reference)
    zoodip                  the paper's ZOODiP on int8 weights (SG + PUTS; embedded model: PUTS [800, 1000), n = 8)
    zoodip-no-sg, zoodip-no-puts, zoodip-no-sg-no-puts           the paper's ablation (Table 3 / Fig. 6)
    budget-*                candidates for the improved variant, each given at most 1/3 of zoodip's UNet
                            forward passes (--budget-fraction): bigger step + cosine decay, directions
                            inside the SG subspace, antithetic pairs, more directions per step, directions in
                            the vocabulary's top-16 principal subspace (budget-vocab16 = zoodip-fast as shipped;
                            zoodip-vocab16 at zoodip's steps)

Bars: zoodip's world CLIP-I and EffNet >= 0.97 x ti's and above the floor; zoodip's prompt accuracy
and world CLIP-T >= ti's - 0.02; the best budget-* variant reaches zoodip's final world CLIP-I.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("world_clip_i", "subject_attr_acc", "effnet", "world_clip_t", "prompt_accuracy")
GAP_METRICS = ("world_clip_i", "subject_attr_acc")  # fidelity with a floor and a ceiling per subject
PAPER_PUTS = {"t_low": 500, "t_high": 900}     # ZOODiP's PUTS interval for SD-1.5 (zoodip_study pins it)


def variants(zoodip_steps: int, zoodip_lr: float, fraction: float, ti_steps: int = 0, zoodip_n: int = 2,
             fast_steps: int = 0) -> dict[str, tuple[str, dict, int]]:
    """name -> (method, method settings, steps). zoodip uses n + 1 UNet passes a step (forward RGE; n = 8 on the
    embedded model since the oracle study, 2 in the paper); the budget-* candidates pin their own n.
    budget-vocab16 is zoodip-fast as shipped (``fast_steps``; default: the whole budget)."""
    passes = (zoodip_n + 1) * zoodip_steps * fraction       # the budget of every budget-* variant
    fast = {"lr": 3 * zoodip_lr, "schedule": "cosine", "n": 2}
    vocab = {"vocab_directions": 16, "n": 2}                       # = zoodip-fast (ZOODiP's embedded interval)
    return {
        "ti": ("ti", {}, ti_steps),
        "zoodip": ("zoodip", {}, zoodip_steps),
        "zoodip-no-sg": ("zoodip", {"sg": False}, zoodip_steps),
        "zoodip-no-puts": ("zoodip", {"puts": False}, zoodip_steps),
        "zoodip-no-sg-no-puts": ("zoodip", {"sg": False, "puts": False}, zoodip_steps),
        "budget-paper": ("zoodip", {}, int(passes // (zoodip_n + 1))),       # the method, cut short
        "budget-cosine": ("zoodip", fast, int(passes // 3)),
        "budget-cosine-subspace": ("zoodip", {**fast, "subspace_directions": True}, int(passes // 3)),
        "budget-cosine-antithetic": ("zoodip", {**fast, "scheme": "central"}, int(passes // 4)),
        "budget-cosine-n8": ("zoodip", {**fast, "n": 8}, int(passes // 9)),
        "zoodip-vocab16": ("zoodip", vocab, zoodip_steps),                     # directions in the vocabulary's
        "budget-vocab16": ("zoodip", vocab, min(fast_steps, int(passes // 3)) if fast_steps   # top-16 principal
                           else int(passes // 3)),                                           # subspace
    }


def prepare_run_dir(out: Path, method: str, section: dict, steps: int, model: str) -> bool | None:
    """None when ``out`` holds a finished, current run (keep it); else whether to resume from its checkpoint.
    A stale finished run, or one that died before its first checkpoint, is removed."""
    if (out / "run.json").is_file():
        why = stale(out, method, section, steps, model)
        if why is None:
            return None
        print(f"  {out}: {why}; training it again", file=sys.stderr)
        shutil.rmtree(out)
    resume = (out / "checkpoint.pt").is_file()
    if out.exists() and not resume:
        shutil.rmtree(out)                          # died before its first checkpoint
    return resume


def run_config(subject: Path, method: str, section: dict, steps: int, out: Path, seed: int, threads: int,
               model: str, extra: dict | None = None):
    """The personalize settings of one run into ``out``, or None when a finished, current run is there (a stale
    one is removed; an interrupted one is resumed). ``extra``: more run settings (e.g. checkpoint_every)."""
    from quantdream.methods import section_name
    from quantdream.train import build_config
    from quantdream.world.subjects import load_subject
    resume = prepare_run_dir(out, method, section, steps, model)
    if resume is None:
        return None
    subj = load_subject(subject)
    overrides = {"images": str(subject), "token": f"<{subject.name}>", "init_word": subj["class_word"],
                 "out": str(out), "model": model, "method": method, "seed": seed, "threads": threads, "sample_every": 0,
                 "resume": resume, section_name(method): section, **(extra or {})}
    if steps:
        overrides["steps"] = steps
    return build_config(overrides=overrides)


def train_on_ray(runs: list[tuple[str, Path, str, object]], out: Path, address: str | None) -> None:
    """Train (job name, subject, method, run config) as Ray tasks with ``quantdream batch``'s requests and
    retries (a killed worker's run continues from its checkpoint); stops if any job fails."""
    from quantdream.batch import BatchSettings, Job, estimate_memory_mib, run_batch
    jobs = [Job(name=name, method=method, subject=subject, cfg=cfg, num_cpus=max(1, cfg.threads),
                memory_mib=estimate_memory_mib(method, cfg.model)) for name, subject, method, cfg in runs]
    try:
        report = run_batch(jobs, out, BatchSettings(address=address, callback=lambda row: print(
            f"  {row['job']}: {row['status']}", file=sys.stderr)))
    except ValueError as e:   # no Ray installed, a job larger than the cluster: one line, nothing trained
        raise SystemExit(f"--ray: {e}") from None
    failed = [f"{r['job']} ({r.get('note', r['status'])})" for r in report["rows"] if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} Ray jobs did not finish: {'; '.join(failed)}; see {out / 'batch.md'}")


def train(subject: Path, name: str, method: str, section: dict, steps: int, out: Path, seed: int,
          threads: int, model: str, extra: dict | None = None, callback=None) -> Path:
    """One personalize run into ``out``; a finished run is kept, an interrupted one resumed. ``extra``: more
    run settings (e.g. checkpoint_every); ``callback``: personalize's per-step callback."""
    from quantdream.train import personalize
    cfg = run_config(subject, method, section, steps, out, seed, threads, model, extra)
    if cfg is None:
        return out
    t = time.perf_counter()
    res = personalize(cfg, callback=callback)
    if not res.completed:
        raise KeyboardInterrupt
    print(f"  trained {name} on {subject.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def model_defaults(model: str) -> dict:
    """The per-method defaults personalize applies to ``model``: the embedded model's or Stable Diffusion's."""
    from quantdream.train import EMBEDDED_DEFAULTS, SD_DEFAULTS, check_model
    return EMBEDDED_DEFAULTS if check_model(model)[1] else SD_DEFAULTS


def stale(out: Path, method: str, section: dict, steps: int, model: str) -> str | None:
    """Why a finished run under ``out`` no longer matches what is asked (changed defaults), or None.
    Every setting the run recorded is compared with what the method would use now, so a changed default of
    the method itself (e.g. tuneqdm's num_experts) also counts; settings added since the run are not."""
    import dataclasses

    from quantdream.methods import method_class
    info = json.loads((out / "run.json").read_text())
    defaults = model_defaults(model)[method]
    asked = {**defaults["section"], **section}
    want = json.loads(json.dumps(dataclasses.asdict(method_class(method).config_class(**asked))))
    have = info.get("method_config", {})
    diff = {k: (have.get(k), v) for k, v in want.items() if (k in have or k in asked) and have.get(k) != v}
    if info.get("method") != method or info.get("steps") != (steps or defaults["steps"]) or diff:
        return f"made with {info.get('method')}, {info.get('steps')} steps, {diff or 'same settings'}"
    return None


def evaluate(runs: dict[str, Path], out: Path, settings, evaluator: str | None) -> dict:
    """``quantdream evaluate --baseline`` over one subject's runs. An existing evaluation with the same
    settings is kept and only the runs it lacks (new variants, or runs trained after it) are rendered and
    merged in: the same seeds make every row independent of the others."""
    import dataclasses

    from quantdream.eval.protocol import evaluate_runs, group_means, save_result
    f = out / "metrics.json"
    if f.is_file():
        m = json.loads(f.read_text())
        same = json.loads(json.dumps({**dataclasses.asdict(settings), "kinds": list(settings.kinds or []) or None}))
        if m["settings"] == same:
            t = f.stat().st_mtime
            want = {str(p) for p in runs.values()}
            fresh = {r["run_dir"] for r in m["rows"] if r["run_dir"] in want
                     and (Path(r["run_dir"]) / "run.json").stat().st_mtime <= t}
            todo = [p for p in runs.values() if str(p) not in fresh]
            rows = [r for r in m["rows"] if r["run_dir"] is None or r["run_dir"] in fresh]
            if todo:
                part = out / "partial"
                shutil.rmtree(part, ignore_errors=True)
                new = evaluate_runs(todo, part, evaluator_dir=evaluator,
                                    settings=dataclasses.replace(settings, baseline=False))
                for g in (part / "grids").iterdir():
                    g.replace(out / "grids" / g.name)
                shutil.rmtree(part)
                rows += new["rows"]
            if todo or len(rows) != len(m["rows"]):
                m.update(rows=rows, means=group_means(rows))
                save_result(out, m)
            return m
        shutil.rmtree(out)
    return evaluate_runs(list(runs.values()), out, evaluator_dir=evaluator, settings=settings)


def subject_rows(name: str, runs: dict[str, Path], m: dict, info_keys=("unet_forward_passes",)) -> list[dict]:
    """One row per evaluated run of a subject: its variant (the floor for the init word alone), METRICS and
    ``info_keys`` from its run.json."""
    by_dir = {str(p): v for v, p in runs.items()}
    rows = []
    for r in m["rows"]:
        info = json.loads((Path(r["run_dir"]) / "run.json").read_text()) if r["run_dir"] else {}
        rows.append({"variant": by_dir.get(r["run_dir"], f"floor ({r['weights']})"), "subject": name,
                     **{k: r["metrics"].get(k) for k in METRICS}, **{k: info.get(k) for k in info_keys}})
    return rows


def add_harness_args(ap: argparse.ArgumentParser, out: str | None, out_help: str | None = None) -> None:
    """The options every per-subject benchmark here shares: subjects, evaluation, seed, threads, model, --out."""
    a = ap.add_argument
    a("--subjects", default="", help="comma-separated names under examples/subjects (default all)")
    a("--images-per-prompt", dest="images_per_prompt", type=int, default=4)
    a("--prompts", default=None, help="prompt kinds: context,property,composition (default all)")
    a("--eval-steps", dest="eval_steps", type=int, default=0,
      help="DDIM steps of the evaluation images (default: the model's, 25 on the embedded model)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=2)
    a("--model", default="tiny", help="tiny (the embedded model, default) or a diffusers folder")
    a("--evaluator", default=None, help="world evaluator folder (default: the packaged one)")
    a("--out", default=out, help=out_help)


def eval_settings(a):
    """``quantdream evaluate``'s settings from :func:`add_harness_args`' options, with the floor."""
    from quantdream.eval.protocol import EvalSettings, parse_kinds
    return EvalSettings(images_per_prompt=a.images_per_prompt, kinds=parse_kinds(a.prompts), seed=a.seed,
                        steps=a.eval_steps, baseline=True)


def subject_dirs(a) -> list[Path]:
    """--subjects (default: every example subject) as folders; an unknown name stops before any training."""
    root = ROOT / "examples" / "subjects"
    names = [s for s in a.subjects.split(",") if s] or sorted(
        d.name for d in root.iterdir() if (d / "subject.json").is_file())
    for name in names:
        if not (root / name / "subject.json").is_file():
            raise SystemExit(f"no subject {name!r} under examples/subjects")
    return [root / n for n in names]


def mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def gap_closed(rows: list[dict], ceilings: dict[str, dict]) -> dict:
    """{variant: {metric: mean over subjects of (variant - floor) / (ceiling - floor)}} for GAP_METRICS,
    the floor being the init word alone on the variant's weights (None where a part is missing)."""
    floor = {(r["subject"], r["variant"][len("floor ("):-1]): r for r in rows if r["variant"].startswith("floor (")}
    per: dict[str, dict[str, list]] = {}
    for r in rows:
        f = floor.get((r["subject"], r.get("weights")))
        if r["variant"].startswith("floor") or f is None:
            continue
        for k in GAP_METRICS:
            c = ceilings.get(r["subject"], {}).get(k)
            ok = None not in (r.get(k), f.get(k), c) and c != f[k]
            per.setdefault(r["variant"], {}).setdefault(k, []).append((r[k] - f[k]) / (c - f[k]) if ok else None)
    return {v: {k: mean(xs) for k, xs in d.items()} for v, d in per.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(ap, "out/bench_personalization")
    ap.add_argument("--ray", action="store_true", help="train the runs as Ray tasks first (quantdream batch's requests "
                    "and retries; pip install 'quantdream[batch]'), then evaluate")
    ap.add_argument("--ray-address", dest="ray_address", default=None, help="an existing Ray cluster (default: a local one)")
    ap.add_argument("--variants", default="", help="comma-separated variants (default all; see above)")
    ap.add_argument("--zoodip-steps", dest="zoodip_steps", type=int, default=0,
                    help="zoodip's steps (default: personalize's embedded-model default)")
    ap.add_argument("--ti-steps", dest="ti_steps", type=int, default=0,
                    help="textual inversion's steps (default: personalize's embedded-model default)")
    ap.add_argument("--budget-fraction", dest="budget_fraction", type=float, default=1 / 3,
                    help="forward-pass budget of the budget-* variants as a fraction of zoodip's (default 1/3)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from quantdream.methods.zoodip import ZoodipConfig
    settings = eval_settings(a)
    defaults = model_defaults(a.model)
    z = defaults["zoodip"]
    zc = ZoodipConfig(**z["section"])
    table = variants(a.zoodip_steps or z["steps"], zc.lr, a.budget_fraction, a.ti_steps, zc.n,
                     defaults["zoodip-fast"]["steps"])
    chosen = [v for v in a.variants.split(",") if v] or list(table)
    unknown = [v for v in chosen if v not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(table)}")
    subjects = subject_dirs(a)
    names = [d.name for d in subjects]
    out = Path(a.out).resolve()
    rows: list[dict] = []
    ceilings: dict[str, dict] = {}
    if a.ray:
        todo = [(f"{subject.name}-{v}", subject, table[v][0], cfg) for subject in subjects for v in chosen
                if (cfg := run_config(subject, *table[v], out / "runs" / subject.name / v, a.seed, a.threads,
                                      a.model)) is not None]
        if todo:
            train_on_ray(todo, out / "ray", a.ray_address)
    for subject in subjects:
        name = subject.name
        runs = {v: train(subject, v, *table[v], out / "runs" / name / v, a.seed, a.threads, a.model)
                for v in chosen}
        m = evaluate(runs, out / "eval" / name, settings, a.evaluator)
        rows += subject_rows(name, runs, m, ("unet_forward_passes", "seconds", "steps", "weights"))
        ceilings[name] = {k: (m.get("subject_ceiling") or {}).get(name, {}).get(k) for k in GAP_METRICS}
    res: dict = {"subjects": names, "seed": a.seed, "threads": a.threads, "images_per_prompt": a.images_per_prompt,
                 "variants": {}}
    for v in sorted({r["variant"] for r in rows if r["variant"].startswith("floor")}) + chosen:
        rs = [r for r in rows if r["variant"] == v]
        res["variants"][v] = {k: mean([r[k] for r in rs]) for k in METRICS + ("unet_forward_passes", "seconds", "steps")}
        if rs and v in table:
            res["variants"][v].update(method=table[v][0], settings=table[v][1], weights=rs[0]["weights"])
    res["per_subject"] = rows
    res["ceiling"] = {"per_subject": ceilings, **{k: mean([c[k] for c in ceilings.values()]) for k in GAP_METRICS}}
    res["gap_closed"] = gap_closed(rows, ceilings)
    V = res["variants"]
    bars: dict = {}
    if "zoodip" in V and "ti" in V:
        zd, ti, fl = V["zoodip"], V["ti"], V.get(f"floor ({V['zoodip'].get('weights')})", {})
        for k in ("world_clip_i", "effnet"):
            bars[f"zoodip_{k}_ratio_to_ti"] = zd[k] / ti[k] if zd[k] and ti[k] else None
            bars[f"zoodip_{k}_ratio_to_ti>=0.97"] = bars[f"zoodip_{k}_ratio_to_ti"] is not None and \
                bars[f"zoodip_{k}_ratio_to_ti"] >= 0.97
            bars[f"zoodip_{k}_minus_floor"] = zd[k] - fl[k] if zd[k] is not None and fl.get(k) is not None else None
        for k in ("prompt_accuracy", "world_clip_t"):
            bars[f"zoodip_{k}_minus_ti"] = zd[k] - ti[k] if zd[k] is not None and ti[k] is not None else None
            bars[f"zoodip_{k}>=ti-0.02"] = bars[f"zoodip_{k}_minus_ti"] is not None and bars[f"zoodip_{k}_minus_ti"] >= -0.02
        bars["main_job_zoodip_train_seconds"] = zd["seconds"]
    budget = {v: V[v] for v in chosen if v.startswith("budget-")}
    if "zoodip" in V and budget:
        best = max(budget, key=lambda v: budget[v]["world_clip_i"] or -1)
        bars["best_budget_variant"] = best
        bars["best_budget_world_clip_i"] = budget[best]["world_clip_i"]
        bars["zoodip_final_world_clip_i"] = V["zoodip"]["world_clip_i"]
        bars["best_budget_passes_fraction"] = budget[best]["unet_forward_passes"] / V["zoodip"]["unet_forward_passes"]
        bars["best_budget_reaches_zoodip"] = budget[best]["world_clip_i"] >= V["zoodip"]["world_clip_i"]
    res["ablation"] = {v: {k: V[v][k] for k in ("world_clip_i", "effnet", "world_clip_t", "prompt_accuracy")}
                       for v in ("zoodip", "zoodip-no-sg", "zoodip-no-puts", "zoodip-no-sg-no-puts") if v in V}
    res["bars"] = bars
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
