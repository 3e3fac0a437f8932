"""`quantdream compare`: train every method on one subject, evaluate them, measure their memory, and
write one report (ZOODiP Table 1 columns, its Figure 1 scatter, sample grids).

Stages (each calls the library; this module only plans, orders and reports progress):
    1. plan      validate every input (subject, methods, settings of every run, output folder) before
                 anything is written
    2. train     ``train.personalize`` per method into OUT/runs/<method>/
    3. evaluate  ``eval.protocol.evaluate_runs`` over the finished runs into OUT/eval/
    4. memory    ``bench.memory.bench_memory`` (one fresh subprocess per method) into OUT/memory/
    5. report    ``eval.report``: OUT/report.json, OUT/report.md, OUT/figure1.png, OUT/grids/
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..bench.memory import BenchSpec
    from ..eval.protocol import EvalSettings
    from ..train import RunConfig

logger = logging.getLogger(__name__)

EPILOG = """examples:
  quantdream compare --subject examples/subjects/teal_bag --methods all --out cmp/teal_bag
  quantdream compare --subject examples/subjects/teal_bag --methods zoodip,ti,peqa --steps 50 --out cmp/quick
  quantdream compare --subject photos/ --init-word bag --methods zoodip,ti --model ~/models/sd15 --out cmp/sd
  quantdream compare ... --out cmp/teal_bag --resume           # after Ctrl-C: finished methods are kept

Token methods (zoodip, zoodip-fast, ti, gf-ti) learn "<subject-name>"; weight methods (dreambooth, lora, qlora, peqa,
tuneqdm*) use the identifier prompt "sks <class>". Each method trains for its own default number of steps
unless --steps / --method-steps say otherwise, and on its own default weights (ti on the float model, as in
ZOODiP Table 1) unless --method-weights says otherwise. Training memory comes from `quantdream bench memory` on
--memory-arch (random weights, a fresh subprocess per method; none: skip it).

Outputs: OUT/report.md (Table 1 + Figure 1 + samples), OUT/report.json, OUT/figure1.png, OUT/grids/
(one grid per prompt, rows: methods), OUT/runs/<method>/, OUT/eval/ (metrics, one grid per method, rows:
prompts), OUT/memory/.
"""

MEMORY_ARCHS = ("tiny", "sd15", "sd21", "sdxl", "none")
# empty: every method on its own default weights (ti unquantized, as in ZOODiP Table 1)
DEFAULT_METHOD_WEIGHTS = ""
# what a run folder may hold before its first checkpoint: safe to clear and start again on --resume
PRE_CHECKPOINT = {"config.toml", "class_images", "samples", "snapshots"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="train every method on one subject and write one report (Table 1, Figure 1, samples)",
        description="Personalize one subject with each method, score them with the evaluation protocol, "
                    "measure training memory in fresh subprocesses, and write one report: the columns of "
                    "ZOODiP's Table 1, the memory-vs-CLIP-I scatter of its Figure 1, and sample grids.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--subject", required=True, help="subject folder: photos + subject.json (e.g. examples/subjects/teal_bag), "
                                       "or plain photos with --init-word")
    a("--methods", default="all", help="comma-separated methods, or all (default): zoodip, zoodip-fast, ti, gf-ti, "
                                       "dreambooth, lora, qlora, peqa, tuneqdm, tuneqdm-s1, tuneqdm-s2")
    a("--out", required=True, help="output folder (new or empty; with --resume, the interrupted comparison)")
    a("--model", default="tiny", help="'tiny' (the embedded model, default), a local Stable Diffusion "
                                             "folder or single-file .safetensors/.ckpt")
    a("--init-word", dest="init_word",
      help="class word (default: subject.json's class_word; required for plain photos)")
    a("--token", help='token of the token methods (default "<subject-name>")')
    a("--steps", type=int, default=0, help="training steps of every method (default: each method's own default)")
    a("--method-steps", dest="method_steps", default="",
      help="steps per method, e.g. zoodip=1500,ti=400 (overrides --steps for those methods)")
    a("--method-weights", dest="method_weights", default=DEFAULT_METHOD_WEIGHTS,
      help="frozen-model quantization per method, e.g. ti=int8,zoodip=int4 (default: each method's own, see "
           "quantdream personalize --help; ti unquantized as in ZOODiP Table 1)")
    a("--seed", type=int, default=0, help="seed of training and of the evaluation images (default 0)")
    a("--images-per-prompt", dest="images_per_prompt", type=int, default=4,
      help="evaluation images per prompt (default 4)")
    a("--prompts", help="prompt kinds to evaluate, comma-separated: context,property,composition (default all)")
    a("--eval-steps", dest="eval_steps", type=int, default=0,
      help="DDIM steps of the evaluation images (default 25 on the embedded model, 50 otherwise)")
    a("--baseline", action="store_true",
      help="also evaluate the init word with no personalization (the floor), on the model each run renders on")
    a("--clip", help="local transformers CLIP folder for real CLIP-I / CLIP-T")
    a("--dino", help="local transformers DINOv2 folder for the real DINO metric")
    a("--evaluator", help="world evaluator folder (default: the packaged one)")
    a("--memory-arch", dest="memory_arch", default="tiny", choices=MEMORY_ARCHS,
      help="architecture of the memory bench (random weights): tiny (default), sd15, sd21, sdxl, or none to skip")
    a("--memory-steps", dest="memory_steps", type=int, default=2, help="training steps the bench measures (default 2)")
    a("--memory-resolution", dest="memory_resolution", type=int, default=0,
      help="image size of the memory bench (default: the architecture's native size)")
    a("--memory-timeout", dest="memory_timeout", type=float, default=0,
      help="seconds per method in the bench (default: none)")
    a("--threads", type=int, default=0, help="CPU threads for torch, here and in each bench subprocess")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train and render (default auto)")
    a("--config", help="TOML file with settings for every run (flags override it)")
    a("--ray", action="store_true", help="train the methods as Ray tasks (as `quantdream batch`: each with its CPU and "
                                         "memory request, several at once where they fit; a killed worker's "
                                         "training continues from its checkpoint); needs pip install ray")
    a("--ray-address", dest="ray_address", help="with --ray: an existing Ray cluster (default: a local one)")
    a("--resume", action="store_true", help="continue the comparison in --out: finished methods are kept, an "
                                            "interrupted one continues from its checkpoint")
    a("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
      help="any personalize setting, e.g. zoodip.n=4 or sample_steps=10 (every method's run sees it)")
    return p


# ----------------------------------------------------------------------------- 1. plan
@dataclass
class Plan:
    """Everything the later stages need, checked before anything is written."""

    out: Path
    methods: list[str]
    images: Path                      # the training photos
    subject: dict                     # subject.json contents (+ "dir")
    subject_dir: Path                 # what evaluate reads subject.json from (OUT/subject for plain photos)
    configs: dict[str, RunConfig]     # resume is set where a checkpoint waits
    finished: dict[str, dict]         # run.json of the runs kept from an earlier invocation
    stale: list[Path]                 # run folders that died before their first checkpoint (cleared)
    eval_settings: EvalSettings
    memory_specs: list[BenchSpec]     # one per method ([] with --memory-arch none)
    settings: dict                    # what report.json records
    write_subject: bool = False
    notes: list[str] = field(default_factory=list)


def parse_methods(text: str) -> list[str]:
    from ..methods import METHODS
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--methods is empty; give a comma-separated list of {', '.join(METHODS)}, or all")
    if names == ["all"]:
        return list(METHODS)
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown method{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                         f"choose from {', '.join(METHODS)}, or all")
    return list(dict.fromkeys(names))


def parse_per_method(text: str, methods: list[str], flag: str, example: str, strict: bool = True) -> dict[str, str]:
    """'zoodip=1500,ti=400' -> {"zoodip": "1500", "ti": "400"}; with ``strict``, every name must be in ``methods``
    (otherwise names of methods not run are dropped)."""
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects METHOD=VALUE pairs like {example}, got {part!r}")
        if name not in methods:
            if strict:
                raise ValueError(f"{flag} names {name!r}, which is not among --methods ({', '.join(methods)})")
            continue
        out[name] = value
    return out


def parse_method_steps(text: str, methods: list[str]) -> dict[str, int]:
    out = parse_per_method(text, methods, "--method-steps", "zoodip=1500,ti=400")
    bad = {m: v for m, v in out.items() if not v.isdigit()}
    if bad:
        raise ValueError(f"--method-steps: steps must be whole numbers >= 0, got {bad}")
    return {m: int(v) for m, v in out.items()}


def parse_method_weights(text: str, methods: list[str]) -> dict[str, str]:
    from ..train import WEIGHTS
    out = parse_per_method(text, methods, "--method-weights", "ti=int8,zoodip=int4",
                           strict=text != DEFAULT_METHOD_WEIGHTS)
    bad = {m: v for m, v in out.items() if v not in WEIGHTS and v != "auto"}
    if bad:
        raise ValueError(f"--method-weights: {bad} is not one of auto, {', '.join(WEIGHTS)}")
    return out


def _run_config(args, method: str, images: Path, init_word: str, token: str, steps: int, weights: str | None,
                out: Path):
    """The RunConfig of one method, through personalize's own flag handling (config_from_args)."""
    from ..methods import method_class
    from .personalize import FLAGS, config_from_args
    ns = argparse.Namespace(**{f: None for f in FLAGS})
    vars(ns).update(images=str(images), init_word=init_word, out=str(out), model=args.model, method=method,
                    seed=args.seed, device=args.device, assignments=args.assignments, config=args.config, lr=None,
                    steps=steps or None, threads=args.threads or None, weights=weights,
                    token=token if method_class(method).kind == "token" else None)
    return config_from_args(ns)


def _check_finished(summary: dict, cfg, weights: str, run_dir: Path) -> None:
    """A finished run kept by --resume must be the run this comparison asks for."""
    asked = {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "weights": weights}
    if cfg.steps:
        asked["steps"] = cfg.steps
    diff = [f"{k}: {summary.get(k)!r} (asked {v!r})" for k, v in asked.items() if summary.get(k) != v]
    if diff:
        raise ValueError(f"--resume: the finished run in {str(run_dir)!r} differs from this comparison "
                         f"({', '.join(diff)}); use the same settings or a new --out")


def _run_state(run_dir: Path, cfg, weights: str) -> str:
    """new | finished (run.json, checked against ``cfg``) | checkpoint (interrupted) | stale (died before
    its first checkpoint: only files personalize writes up front, cleared and started again)."""
    if (run_dir / "run.json").is_file():
        _check_finished(json.loads((run_dir / "run.json").read_text()), cfg, weights, run_dir)
        return "finished"
    if (run_dir / "checkpoint.pt").is_file():
        return "checkpoint"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        extra = sorted(p.name for p in run_dir.iterdir() if p.name not in PRE_CHECKPOINT)
        if extra:
            raise ValueError(f"{str(run_dir)!r} holds {extra} but neither run.json nor checkpoint.pt; "
                             f"move it away or choose a new --out")
        return "stale"
    return "new"


def make_plan(args) -> Plan:
    """Validate every input; nothing is written here."""
    from ..bench.memory import WEIGHTS as BENCH_WEIGHTS
    from ..bench.memory import BenchSpec, check_spec
    from ..eval.protocol import EvalSettings, parse_kinds, select_prompts
    from ..eval.real_encoders import check_clip_folder, check_dino_folder
    from ..methods import method_class, section_name
    from ..methods.base import config_from_dict
    from ..models.sample import slug
    from ..train import _validate, check_model
    methods = parse_methods(args.methods)
    method_steps = parse_method_steps(args.method_steps, methods)
    method_weights = parse_method_weights(args.method_weights, methods)
    for name in ("steps", "seed", "eval_steps", "memory_resolution", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("images_per_prompt", "memory_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "ray", False):
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise ValueError("--ray needs Ray: pip install 'quantdream[batch]' (or pip install ray)")
    elif getattr(args, "ray_address", None):
        raise ValueError("--ray-address applies only with --ray")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {args.out!r} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        hint = " or pass --resume to continue the comparison in it" if (out / "runs").is_dir() else ""
        raise ValueError(f"--out {args.out!r} already exists and is not empty; choose a new folder{hint}")
    images = Path(args.subject)
    from ..data.subject import read_subject
    subject, write_subject = read_subject(images, args.init_word)
    kinds = parse_kinds(args.prompts)
    select_prompts(subject, kinds)
    init_word = args.init_word or subject["class_word"]
    token = args.token or f"<{slug(subject.get('name') or images.name, 40).replace('_', '-')}>"
    check_model(args.model)
    if args.clip:
        check_clip_folder(args.clip)
    if args.dino:
        check_dino_folder(args.dino)
    if args.evaluator and not Path(args.evaluator).is_dir():
        raise FileNotFoundError(f"--evaluator {args.evaluator!r} is not a folder")

    configs, finished, stale, weights = {}, {}, [], {}
    for m in methods:
        run_dir = out / "runs" / m
        cfg = _run_config(args, m, images, init_word, token, method_steps.get(m, args.steps),
                          method_weights.get(m), run_dir)
        section, weights[m] = _validate(cfg)       # method, bit width, numbers; then the method's own table
        config_from_dict(method_class(m).config_class, section, section_name(m))
        state = _run_state(run_dir, cfg, weights[m])
        if state == "finished":
            finished[m] = json.loads((run_dir / "run.json").read_text())
        elif state == "checkpoint":
            cfg.resume = True
        elif state == "stale":
            stale.append(run_dir)
        configs[m] = cfg

    specs = []
    if args.memory_arch != "none":
        # the bench measures each method at the weights its run trains on ("": the bench's own choice, e.g. nf4)
        specs = [BenchSpec(arch=args.memory_arch, method=m, resolution=args.memory_resolution,
                           steps=args.memory_steps, seed=args.seed, threads=args.threads, device=args.device,
                           weights=weights[m] if weights[m] in BENCH_WEIGHTS else "")
                 for m in methods]
        for s in specs:
            check_spec(s)
    eval_settings = EvalSettings(images_per_prompt=args.images_per_prompt, kinds=kinds, seed=args.seed,
                                 steps=args.eval_steps, baseline=args.baseline, device=args.device)
    settings = {"model": args.model, "methods": methods, "init_word": init_word, "token": token,
                "steps": {m: configs[m].steps or "default" for m in methods},
                "weights": weights, "seed": args.seed,
                "images_per_prompt": args.images_per_prompt, "prompts": ",".join(kinds) if kinds else "all",
                "eval_steps": args.eval_steps or "default", "memory_arch": args.memory_arch,
                "memory_steps": args.memory_steps if specs else None, "device": args.device,
                "set": list(args.assignments)}
    if args.resume and (out / "compare.json").is_file():
        old = json.loads((out / "compare.json").read_text())
        keys = ("model", "init_word", "token", "seed")
        diff = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in keys if old.get(k) != settings[k]]
        if str(Path(old.get("subject", "")).resolve()) != str(images.resolve()):
            diff.append(f"subject: {old.get('subject')!r} -> {str(images)!r}")
        if diff:
            raise ValueError(f"--resume: {args.out!r} holds a comparison with other settings ({', '.join(diff)}); "
                             f"use the same settings or a new --out")
    subject_dir = out / "subject" if write_subject else images
    return Plan(out=out, methods=methods, images=images, subject=subject, subject_dir=subject_dir, configs=configs,
                finished=finished, stale=stale, eval_settings=eval_settings, memory_specs=specs,
                settings=settings, write_subject=write_subject)


# ----------------------------------------------------------------------------- 2.-4. the stages
def say(text: str) -> None:
    print(f"compare: {text}", file=sys.stderr, flush=True)


def start(plan: Plan) -> None:
    """The first writes: OUT, compare.json, the subject.json of plain photos, stale run folders cleared."""
    from ..checkpoint import atomic_json
    plan.out.mkdir(parents=True, exist_ok=True)
    atomic_json(plan.out / "compare.json", {**plan.settings, "subject": str(plan.images)})
    if plan.write_subject:
        atomic_json(plan.subject_dir / "subject.json", {k: v for k, v in plan.subject.items() if k != "dir"})
    for d in plan.stale:
        say(f"{d} stopped before its first checkpoint; starting it again")
        shutil.rmtree(d)


def train_all(plan: Plan) -> tuple[dict, bool]:
    """({method: run.json + run_dir, or a failure record}, interrupted?)."""
    from ..train import personalize
    runs: dict[str, dict] = {}
    n = len(plan.methods)
    for i, m in enumerate(plan.methods, 1):
        cfg = plan.configs[m]
        if m in plan.finished:
            say(f"[train {i}/{n}] {m}: finished earlier, kept ({cfg.out})")
            runs[m] = {**plan.finished[m], "run_dir": cfg.out}
            continue
        say(f"[train {i}/{n}] {m}: {'continuing' if cfg.resume else 'training'} -> {cfg.out}")
        try:
            result = personalize(cfg, progress=True)
        except Exception as e:  # one method's failure (a missing backend, out of memory) does not stop the rest
            logger.debug("%s failed", m, exc_info=True)
            say(f"[train {i}/{n}] {m}: failed: {type(e).__name__}: {e}")
            runs[m] = {"status": "failed", "note": f"{type(e).__name__}: {e}", "run_dir": cfg.out}
            continue
        finally:
            gc.collect()
        if not result.completed:
            return runs, True
        s = result.summary
        say(f"[train {i}/{n}] {m}: {s['steps']} steps, {s['unet_forward_passes']} UNet passes, {s['seconds']:.1f} s")
        runs[m] = {**s, "run_dir": cfg.out}
    return runs, False


def train_all_ray(plan: Plan, args) -> tuple[dict, bool]:
    """train_all with every unfinished method as one Ray task (quantdream.batch); OUT/batch.md lists them."""
    from ..batch import BatchSettings, Job, estimate_memory_mib, run_batch
    runs = {m: {**plan.finished[m], "run_dir": plan.configs[m].out} for m in plan.finished}
    for m in plan.finished:
        say(f"[train] {m}: finished earlier, kept ({plan.configs[m].out})")
    jobs = [Job(name=m, method=m, subject=plan.images, cfg=plan.configs[m], num_cpus=args.threads or 1,
                memory_mib=estimate_memory_mib(m, args.model)) for m in plan.methods if m not in plan.finished]
    if jobs:
        say(f"[train] {len(jobs)} methods as Ray tasks -> {plan.out / 'runs'}")

        def show(row: dict) -> None:
            extra = f": {row['steps']} steps, {row['seconds']:.1f} s" if row.get("steps") is not None else ""
            say(f"[train] {row['job']}: {row['status']}{extra}" + (f" ({row['note']})" if row.get("note") else ""))

        report = run_batch(jobs, plan.out, BatchSettings(address=args.ray_address, callback=show))
        for r in report["rows"]:
            m, run_dir = r["job"], plan.configs[r["job"]].out
            if r["status"] == "ok":
                runs[m] = {**json.loads((Path(run_dir) / "run.json").read_text()), "run_dir": run_dir}
            else:
                runs[m] = {"status": "failed", "note": r.get("note", r["status"]), "run_dir": run_dir}
    return {m: runs[m] for m in plan.methods}, False


def _same_evaluation(path: Path, run_dirs: list[str], settings_dict: dict) -> dict | None:
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    dirs = [r["run_dir"] for r in old.get("rows", []) if r.get("run_dir")]
    if sorted(map(str, dirs)) == sorted(run_dirs) and old.get("settings") == settings_dict:
        return old
    return None


def evaluate(plan: Plan, runs: dict, args) -> dict | None:
    from ..eval.protocol import evaluate_runs
    run_dirs = [r["run_dir"] for r in runs.values() if r.get("status") is None]
    if not run_dirs:
        say("[evaluate] no finished run to evaluate")
        return None
    s = plan.eval_settings
    settings_dict = {**dataclasses.asdict(s), "kinds": list(s.kinds) if s.kinds else None}
    if args.resume:
        old = _same_evaluation(plan.out / "eval" / "metrics.json", run_dirs, settings_dict)
        if old is not None:
            say("[evaluate] the same runs were evaluated earlier: kept")
            return old
    say(f"[evaluate] {len(run_dirs)} runs x {s.images_per_prompt} images per prompt -> {plan.out / 'eval'}")

    def show(row: dict) -> None:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in row["metrics"].items() if isinstance(v, float))
        say(f"[evaluate] {row['name']}: {parts or 'no metrics (see the notes)'}")

    return evaluate_runs(run_dirs, plan.out / "eval", subject=plan.subject_dir, settings=s, clip=args.clip,
                         dino=args.dino, evaluator_dir=args.evaluator, callback=show)


def measure_memory(plan: Plan, args) -> dict | None:
    from ..bench.memory import bench_memory, memory_markdown
    from ..checkpoint import atomic_json, atomic_write
    if not plan.memory_specs:
        say("[memory] skipped (--memory-arch none)")
        return None
    path = plan.out / "memory" / "memory.json"
    want = [dataclasses.asdict(s) for s in plan.memory_specs]
    if args.resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("specs") == want and all(r.get("status") != "failed" for r in old.get("rows", [])):
            say("[memory] measured earlier with the same settings: kept")
            return old
    arch = plan.memory_specs[0].arch
    say(f"[memory] {len(plan.memory_specs)} methods on {arch} (random weights), one subprocess each")

    def show(row: dict) -> None:
        if row["status"] == "ok":
            say(f"[memory] {row['method']} ({row['weights']}): training peak "
                f"{row['training_peak']['vmhwm_mib']:.0f} MiB, {row['seconds_per_step']:.3g} s/step")
        else:
            say(f"[memory] {row['method']}: {row['status']} ({row.get('note', '')})")

    result = bench_memory(plan.memory_specs, timeout=args.memory_timeout or None, callback=show)
    result["specs"] = want
    atomic_json(path, result)
    atomic_write(path.with_name("memory.md"), lambda tmp: Path(tmp).write_text(memory_markdown(result)))
    return result


def write_report(plan: Plan, runs: dict, evaluation: dict | None, memory: dict | None) -> dict:
    from ..checkpoint import atomic_json, atomic_write
    from ..eval import report as rep
    rows = rep.method_rows(runs, evaluation, memory, eval_prefix="eval")
    grids = rep.prompt_grids(evaluation, plan.out / "eval", plan.out / "grids") if evaluation else []
    name = plan.subject.get("name") or plan.images.name
    fig = rep.figure1(rows, plan.out / "figure1.png", title=f"{name}: training memory vs subject fidelity "
                                                               f"(ZOODiP Fig. 1)")
    notes = list(plan.notes)
    if plan.write_subject:
        notes.append(f"plain photos: evaluated with the world subjects' prompts and class word "
                     f"{plan.subject['class_word']!r} ({plan.subject_dir / 'subject.json'})")
    report = rep.build_report(rows, subject=plan.subject, settings=plan.settings, evaluation=evaluation,
                              memory=memory, figure=fig, grids=grids, notes=notes)
    atomic_json(plan.out / "report.json", report)
    atomic_write(plan.out / "report.md", lambda tmp: Path(tmp).write_text(rep.report_markdown(report)))
    return report


def run(args) -> int:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    plan = make_plan(args)
    start(plan)
    say(f"{len(plan.methods)} methods on {plan.subject.get('name') or plan.images} ({plan.settings['init_word']}), "
        f"model {args.model} -> {plan.out}")
    runs, interrupted = train_all_ray(plan, args) if args.ray else train_all(plan)
    if interrupted:
        print("interrupted; continue with the same command plus --resume (finished methods are kept)",
              file=sys.stderr)
        return 130
    evaluation = evaluate(plan, runs, args)
    memory = measure_memory(plan, args)
    report = write_report(plan, runs, evaluation, memory)
    failed = [r["method"] for r in report["rows"] if r["status"] != "ok"]
    say(f"[report] {plan.out / 'report.md'}, {plan.out / 'report.json'}, {plan.out / 'figure1.png'}")
    print(f"wrote {plan.out / 'report.md'} ({len(report['rows']) - len(failed)} of {len(report['rows'])} methods"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")")
    return 1 if failed else 0
