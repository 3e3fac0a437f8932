"""The method comparison (ZOODiP's Table 1 and Figure 1) over every example subject. Prints ONE JSON object.

    python benchmarks/comparison.py                                   # all subjects, all methods, sd15 memory
    python benchmarks/comparison.py --subjects teal_bag,olive_coat --methods zoodip,ti,gf-ti
    python benchmarks/comparison.py ... --resume                      # after an interruption
    python benchmarks/comparison.py --refresh-memory --memory-low-memory --out DIR   # new memory rows, same report
    python benchmarks/comparison.py --refresh-memory --memory-low-memory --methods peqa,tuneqdm --out DIR  # 2 rows
    python benchmarks/comparison.py --refresh-methods zoodip --out DIR  # one method trained again, same report
    python benchmarks/comparison.py --subjects teal_bag --methods zoodip,ti --steps 2 --memory-arch tiny \\
        --model /path/to/tiny-sd --images-per-prompt 1 --eval-steps 2     # a smoke run

For each subject, ``quantdream compare`` (OUT/<subject>/: runs, evaluation, report) with each method's own
default number of steps (train.EMBEDDED_DEFAULTS / SD_DEFAULTS) unless --steps / --method-steps say
otherwise; then ``bench memory`` once on --memory-arch (random weights, one fresh subprocess per method:
memory does not depend on the subject). Output: per method, the mean over subjects of the Table-1
columns, the memory rows, and the bars:

    memory_ordering          dreambooth > {ti, peqa, tuneqdm*, lora, qlora} > {zoodip, zoodip-fast, gf-ti} (training memory)
    zoodip_vs_dreambooth     dreambooth / zoodip training memory, bar >= 8.2 (ZOODiP: "up to 8.2x")
    storage                  output size per method (runs and bench)
    gfti_below_zoodip        GF-TI below ZOODiP in subject fidelity at an equal UNet forward-pass budget
    tuneqdm_s2_vs_peqa       TuneQDM S2 prompt accuracy against PEQA's, at equal or better subject fidelity

Also writes OUT/report.md, OUT/report.json and OUT/figure1.png for the means (eval.report).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS_DIR = ROOT / "examples" / "subjects"

# ZOODiP Table 1 / Figure 1 memory order: full fine-tuning > gradient PEFT and TI > forward-only methods
MEMORY_TOP = ("dreambooth",)
MEMORY_MIDDLE = ("ti", "peqa", "tuneqdm", "tuneqdm-s1", "tuneqdm-s2", "lora", "qlora")
MEMORY_BOTTOM = ("zoodip", "zoodip-fast", "gf-ti")
ZOODIP_RATIO_BAR = 8.2
BUDGET_TOLERANCE = 0.1   # "equal forward-pass budget": within 10%


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--subjects", default="", help="comma-separated subject names under examples/subjects (default: all)")
    a("--subjects-dir", dest="subjects_dir", default=str(SUBJECTS_DIR), help="where the subjects are")
    a("--methods", default="all", help="comma-separated methods or all (default); with --refresh-memory, the methods "
                                      "whose memory rows are measured again (the others are kept)")
    a("--model", default="tiny", help="tiny (the embedded model, default) or a local Stable Diffusion folder")
    a("--steps", type=int, default=0, help="steps of every method (default: each method's own default)")
    a("--method-steps", dest="method_steps", default="", help="per method, e.g. zoodip=1500,gf-ti=225")
    a("--method-weights", dest="method_weights", default="",
      help="frozen-model quantization per method, e.g. zoodip=int4 (default: each method's own; ti unquantized)")
    a("--memory-arch", dest="memory_arch", default="sd15", choices=["tiny", "sd15", "sd21", "sdxl", "none"],
      help="architecture of the memory rows (default sd15; none: skip)")
    a("--memory-steps", dest="memory_steps", type=int, default=2)
    a("--memory-resolution", dest="memory_resolution", type=int, default=0, help="default: native (512 on sd15)")
    a("--memory-timeout", dest="memory_timeout", type=float, default=0)
    a("--memory-low-memory", dest="memory_low_memory", action="store_true",
      help="measure every method in the low-memory mode (bench memory --low-memory) instead of as it comes")
    a("--images-per-prompt", dest="images_per_prompt", type=int, default=4)
    a("--prompts", help="prompt kinds (default all)")
    a("--eval-steps", dest="eval_steps", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--evaluator", help="world evaluator folder (default: the packaged one)")
    a("--clip", help="local transformers CLIP folder (real CLIP-I / CLIP-T)")
    a("--dino", help="local transformers DINOv2 folder (real DINO)")
    a("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    a("--out", default=str(ROOT / "runs" / "comparison"), help="output folder (default runs/comparison)")
    a("--resume", action="store_true", help="continue an interrupted benchmark in --out")
    a("--refresh-memory", dest="refresh_memory", action="store_true",
      help="measure the memory rows again and rewrite --out's mean report (report.json, report.md, figure1.png) "
           "with them; its quality columns and bars come from the report as it is (no training, no evaluation)")
    a("--refresh-methods", dest="refresh_methods", default="",
      help="comma-separated methods of --out's mean report to train and evaluate again (e.g. after their defaults "
           "changed) on the report's subjects, seed and protocol, in OUT/refresh/<subject> (with --resume, finished "
           "runs there are kept); their rows replace the old ones, every other row and the memory columns are kept")
    return ap.parse_args(argv)


def subject_dirs(a) -> list[Path]:
    root = Path(a.subjects_dir)
    if a.subjects:
        names = [s.strip() for s in a.subjects.split(",") if s.strip()]
        missing = [n for n in names if not (root / n / "subject.json").is_file()]
        if missing:
            known = sorted(p.name for p in root.iterdir() if (p / "subject.json").is_file()) if root.is_dir() else []
            raise ValueError(f"--subjects: no subject {', '.join(missing)} in {root} (there: {', '.join(known)})")
        return [root / n for n in names]
    dirs = sorted(p for p in root.iterdir() if (p / "subject.json").is_file()) if root.is_dir() else []
    if not dirs:
        raise ValueError(f"no subjects (folders with subject.json) in {root}")
    return dirs


def compare_argv(a, subject: Path, out: Path) -> list[str]:
    argv = ["compare", "--subject", str(subject), "--methods", a.methods, "--out", str(out), "--model", a.model,
            "--seed", str(a.seed), "--images-per-prompt", str(a.images_per_prompt), "--memory-arch", "none",
            "--device", a.device]
    for flag, value in (("--steps", a.steps), ("--method-steps", a.method_steps),
                        ("--method-weights", a.method_weights), ("--prompts", a.prompts),
                        ("--eval-steps", a.eval_steps), ("--threads", a.threads), ("--evaluator", a.evaluator),
                        ("--clip", a.clip), ("--dino", a.dino)):
        if value:
            argv += [flag, str(value)]
    for s in a.assignments:
        argv += ["--set", s]
    return argv + (["--resume"] if a.resume else [])


def memory_path(a, out: Path) -> Path:
    """Where --out keeps the memory rows of a's --memory-arch / --memory-low-memory."""
    return out / f"memory-{a.memory_arch}{'-lowmem' if a.memory_low_memory else ''}" / "memory.json"


def compare_subject(a, subject: Path, out: Path) -> tuple[int, dict | None]:
    """``quantdream compare`` on one subject into ``out`` (its output to stderr: stdout carries only the JSON
    object): its exit code and its report.json (None when it wrote none)."""
    from quantdream.cli.main import main as cli
    with contextlib.redirect_stdout(sys.stderr):
        rc = cli(compare_argv(a, subject, out))
    path = out / "report.json"
    return rc, json.loads(path.read_text()) if path.is_file() else None


def measure_memory(a, methods: list[str], out: Path, keep: dict | None = None) -> dict | None:
    """``bench memory`` of ``methods`` on --memory-arch, written to memory_path(). ``keep``: an earlier result
    whose rows of the other methods stay (--refresh-memory --methods); its ratios are recomputed over all rows."""
    from quantdream.bench.memory import WEIGHTS, BenchSpec, bench_memory, memory_markdown, summarize
    from quantdream.cli.compare import parse_method_weights
    if a.memory_arch == "none":
        return None
    weights = parse_method_weights(a.method_weights, methods)     # as the runs train ("": the method's default)
    specs = [BenchSpec(arch=a.memory_arch, method=m, resolution=a.memory_resolution, steps=a.memory_steps,
                       seed=a.seed, threads=a.threads, device=a.device, low_memory=a.memory_low_memory,
                       weights=weights.get(m) if weights.get(m) in WEIGHTS else "") for m in methods]
    want = [dataclasses.asdict(s) for s in specs]
    path = memory_path(a, out)
    if a.resume and keep is None and path.is_file():
        old = json.loads(path.read_text())
        if old.get("specs") == want and all(r.get("status") != "failed" for r in old.get("rows", [])):
            return old
    print(f"comparison: memory of {len(specs)} methods on {a.memory_arch}", file=sys.stderr, flush=True)
    result = bench_memory(specs, timeout=a.memory_timeout or None)
    result["specs"] = want
    if keep:
        rows, new_specs = {r["method"]: r for r in result["rows"]}, {s["method"]: s for s in want}
        result["rows"] = [rows.pop(r["method"], r) for r in keep["rows"]] + list(rows.values())
        result["specs"] = [new_specs.pop(s["method"], s) for s in keep.get("specs", [])] + list(new_specs.values())
        result["summary"] = summarize(result["rows"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    (path.parent / "memory.md").write_text(memory_markdown(result))
    return result


# ----------------------------------------------------------------------------- bars
def memory_ordering(mem: dict[str, float]) -> dict:
    """Every pair (higher group, lower group) among the measured methods; pass only when all are measured."""
    pairs = ([(h, m) for h in MEMORY_TOP for m in MEMORY_MIDDLE]
             + [(m, b) for m in MEMORY_MIDDLE for b in MEMORY_BOTTOM]
             + [(h, b) for h in MEMORY_TOP for b in MEMORY_BOTTOM])
    checked = [(hi, lo) for hi, lo in pairs if mem.get(hi) is not None and mem.get(lo) is not None]
    violations = [f"{hi} ({mem[hi]:.0f} MiB) <= {lo} ({mem[lo]:.0f} MiB)"
                  for hi, lo in checked if not mem[hi] > mem[lo]]
    missing = [m for m in MEMORY_TOP + MEMORY_MIDDLE + MEMORY_BOTTOM if mem.get(m) is None]
    return {"pass": False if violations else (None if missing or not checked else True),
            "pairs_checked": len(checked), "violations": violations, "not_measured": missing,
            "order_high_to_low": [m for m, _ in sorted(((m, v) for m, v in mem.items() if v is not None),
                                                       key=lambda x: -x[1])]}


def zoodip_vs_dreambooth(mem: dict[str, float], whole: dict[str, float]) -> dict:
    z, d = mem.get("zoodip"), mem.get("dreambooth")
    out = {"bar": ZOODIP_RATIO_BAR, "zoodip_mib": z, "dreambooth_mib": d,
           "ratio": d / z if z and d else None}
    out["pass"] = None if out["ratio"] is None else out["ratio"] >= ZOODIP_RATIO_BAR
    if whole.get("zoodip") and whole.get("dreambooth"):
        out["whole_process_ratio"] = whole["dreambooth"] / whole["zoodip"]
    return out


def per_subject(tables: dict[str, list[dict]], method: str, key: str) -> dict[str, float]:
    return {s: r[key] for s, rows in tables.items() for r in rows
            if r["method"] == method and r.get("status") == "ok" and r.get(key) is not None}


def gfti_below_zoodip(means: dict[str, dict], tables: dict[str, list[dict]], fid: str | None) -> dict:
    z, g = means.get("zoodip"), means.get("gf-ti")
    out = {"metric": fid}
    if not z or not g or fid is None or z.get(fid) is None or g.get(fid) is None:
        return {**out, "pass": None, "note": "needs finished zoodip and gf-ti runs with a subject-fidelity metric"}
    zp, gp = z.get("unet_forward_passes"), g.get("unet_forward_passes")
    ratio = gp / zp if zp and gp else None
    equal = ratio is not None and abs(ratio - 1) <= BUDGET_TOLERANCE
    zs, gs = per_subject(tables, "zoodip", fid), per_subject(tables, "gf-ti", fid)
    below = g[fid] < z[fid]
    out.update(zoodip=z[fid], gf_ti=g[fid], zoodip_forward_passes=zp, gf_ti_forward_passes=gp,
               budget_ratio=ratio, equal_budget=equal, gf_ti_below=below,
               subjects_gf_ti_below=sum(gs[s] < zs[s] for s in zs if s in gs), subjects=len(set(zs) & set(gs)))
    out["pass"] = below if equal else None
    if not equal:
        out["note"] = (f"forward-pass budgets differ (gf-ti / zoodip = {ratio:.2f}); give --method-steps so that both "
                       f"spend the same UNet passes (the embedded defaults do: 1,500 x 9 = 675 x 20)")
    return out


def tuneqdm_s2_vs_peqa(means: dict[str, dict], tables: dict[str, list[dict]], fid: str | None = None) -> dict:
    """TuneQDM's claim: S2 improves prompt accuracy over PEQA at equal or better subject fidelity (``fid``)."""
    t, p = means.get("tuneqdm-s2"), means.get("peqa")
    if not t or not p or t.get("prompt_accuracy") is None or p.get("prompt_accuracy") is None:
        return {"pass": None, "note": "needs finished tuneqdm-s2 and peqa runs with prompt accuracy"}
    ts, ps = per_subject(tables, "tuneqdm-s2", "prompt_accuracy"), per_subject(tables, "peqa", "prompt_accuracy")
    out = {"tuneqdm_s2": t["prompt_accuracy"], "peqa": p["prompt_accuracy"],
           "difference": t["prompt_accuracy"] - p["prompt_accuracy"],
           "tuneqdm_s2_ge_peqa": t["prompt_accuracy"] >= p["prompt_accuracy"],
           "subjects_tuneqdm_s2_ge_peqa": sum(ts[s] >= ps[s] for s in ts if s in ps),
           "subjects": len(set(ts) & set(ps))}
    if fid and t.get(fid) is not None and p.get(fid) is not None:
        out.update(fidelity_metric=fid, tuneqdm_s2_fidelity=t[fid], peqa_fidelity=p[fid],
                   fidelity_difference=t[fid] - p[fid])
    out["pass"] = out["tuneqdm_s2_ge_peqa"] and out.get("fidelity_difference", 0.0) >= 0
    return out


# ----------------------------------------------------------------------------- main
COLUMNS = ["subjects", "status", "note", "weights", "gradient_free", "steps", "unet_forward_passes", "seconds",
           "storage_bytes", "run_peak_mib", "memory_mib", "memory_whole_process_mib", "memory_storage_bytes",
           "memory_status", "memory_note", "clip_t", "clip_i", "dino", "world_clip_t", "world_clip_i", "effnet",
           "prompt_accuracy", "prompt_accuracy_context", "prompt_accuracy_property", "prompt_accuracy_composition"]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.refresh_memory:
        return refresh_memory(a)
    if a.refresh_methods:
        return refresh_methods(a)
    from quantdream.cli.compare import parse_methods
    from quantdream.eval import report as rep
    try:
        subjects = subject_dirs(a)
        methods = parse_methods(a.methods)
    except ValueError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    out = Path(a.out)
    reports, tables, failed_subjects, eval_notes = {}, {}, {}, []
    for i, subject in enumerate(subjects, 1):
        print(f"comparison: subject {i}/{len(subjects)}: {subject.name}", file=sys.stderr, flush=True)
        rc, report = compare_subject(a, subject, out / subject.name)
        if rc == 130:
            print(json.dumps({"error": f"interrupted during {subject.name}; rerun with --resume"}))
            return 130
        if rc == 2 or report is None:
            failed_subjects[subject.name] = f"compare exited with {rc} (see stderr)"
            if rc == 2:                                            # bad input: every subject would fail alike
                print(json.dumps({"error": f"compare refused {subject.name}'s settings (see stderr)"}))
                return 2
            continue
        eval_notes += [n for n in report.get("notes", []) if n not in eval_notes]
        tables[subject.name] = report["rows"]
        reports[subject.name] = str(out / subject.name / "report.md")

    memory = measure_memory(a, methods, out)
    rows = rep.mean_rows(list(tables.values()))
    if memory:
        rows = rep.add_memory(rows, memory)
    means = {r["method"]: {k: r.get(k) for k in COLUMNS} for r in rows}
    fid = rep.fidelity_key(rows)
    bars = {**memory_bars(rows), "gfti_below_zoodip": gfti_below_zoodip(means, tables, fid),
            "tuneqdm_s2_vs_peqa": tuneqdm_s2_vs_peqa(means, tables, fid)}
    settings = {"model": a.model, "methods": methods, "subjects": list(tables), "seed": a.seed,
                "images_per_prompt": a.images_per_prompt}
    write_report(a, out, rows, memory, bars, settings, eval_notes,
                 [f"per-subject reports: {', '.join(reports.values())}"])
    print(json.dumps(result_json(a, out, rows, memory, bars, list(tables), failed_subjects, reports),
                     indent=1, default=str))
    return 0


def memory_bars(rows: list[dict]) -> dict:
    mem = {r["method"]: r.get("memory_mib") for r in rows}
    whole = {r["method"]: r.get("memory_whole_process_mib") for r in rows}
    return {"memory_ordering": memory_ordering(mem), "zoodip_vs_dreambooth": zoodip_vs_dreambooth(mem, whole),
            "storage": {r["method"]: {"run_bytes_mean": r.get("storage_bytes"),
                                      "bench_bytes": r.get("memory_storage_bytes")} for r in rows}}


def write_report(a, out: Path, rows, memory, bars, settings, eval_notes, notes) -> None:
    """The mean report beside the per-subject ones: report.json (with the bars), report.md, figure1.png."""
    from quantdream.checkpoint import atomic_json, atomic_write
    from quantdream.eval import report as rep
    n = len(settings["subjects"])
    out.mkdir(parents=True, exist_ok=True)
    fig = rep.figure1(rows, out / "figure1.png", title=f"mean over {n} subjects: training memory vs "
                                                         f"subject fidelity (ZOODiP Fig. 1)")
    settings = {**settings, "memory_arch": a.memory_arch, "memory_steps": a.memory_steps,
                "memory_low_memory": a.memory_low_memory}
    summary = rep.build_report(rows, subject={"name": f"mean over {n} subjects", "class_word": "various"},
                               settings=settings, memory=memory, figure=fig, evaluation={"notes": eval_notes},
                               notes=notes)
    atomic_json(out / "report.json", {**summary, "bars": bars})
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(rep.report_markdown(summary)))


def refresh_memory(a) -> int:
    """--refresh-memory: new memory rows into --out's existing mean report; everything else is kept. With
    --methods, only those methods' rows are measured again and the others are kept from memory.json."""
    from quantdream.cli.compare import parse_methods
    from quantdream.eval import report as rep
    out = Path(a.out)
    try:
        old, keep = read_report(out, "--refresh-memory")
        rows = [{k: v for k, v in r.items() if not k.startswith("memory_")} for r in old["rows"]]
        subjects, methods = keep["subjects"], [r["method"] for r in rows]
        only, before = None, None
        if a.methods != "all":
            only = parse_methods(a.methods)
            if [m for m in only if m not in methods]:
                raise ValueError(f"--methods: {', '.join(m for m in only if m not in methods)} not in the report "
                                 f"(it has {', '.join(methods)})")
            path = memory_path(a, out)
            if not path.is_file():
                raise ValueError(f"--refresh-memory --methods: no {path} to keep the other rows from")
            before = json.loads(path.read_text())
    except ValueError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    memory = measure_memory(a, only or methods, out, keep=before)
    if memory:
        rows = rep.add_memory(rows, memory)
    bars = {**old.get("bars", {}), **memory_bars(rows)}
    automatic = ("train memory:", "in-run peak:", "memory columns measured again", "memory rows of")
    revs = sorted({str(r.get("git")) for r in (memory or {}).get("rows", [])})
    if only:
        new_revs = sorted({str(r.get("git")) for r in (memory or {}).get("rows", []) if r["method"] in only})
        note = (f"memory rows of {', '.join(only)} measured again (--refresh-memory --methods, commit "
                f"{', '.join(new_revs)}); the other memory rows from commit "
                f"{', '.join(sorted(set(revs) - set(new_revs)) or new_revs)}; every other column from the runs")
    else:
        note = (f"memory columns measured again (--refresh-memory, commit {', '.join(revs)}); every other "
                f"column comes from the original runs")
    write_report(a, out, rows, memory, bars, keep, [],
                 [n for n in old.get("notes", []) if not n.startswith(automatic)] + [note])
    print(json.dumps(result_json(a, out, rows, memory, bars, subjects, {}, {}), indent=1, default=str))
    return 0


def read_report(out: Path, flag: str) -> tuple[dict, dict]:
    """--out's mean report and its settings without the memory ones; ValueError says what is wrong."""
    path = out / "report.json"
    if not path.is_file():
        raise ValueError(f"{flag}: no report.json in {out} (run the comparison first)")
    try:
        old = json.loads(path.read_text())
        keep = {k: v for k, v in old["settings"].items() if not k.startswith("memory_")}
        if not isinstance(keep["subjects"], list) or not all(isinstance(r["method"], str) for r in old["rows"]):
            raise TypeError("subjects or rows of the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{flag}: {path} is not a comparison report ({type(e).__name__}: {e})") from None
    return old, keep


def refresh_methods(a) -> int:
    """--refresh-methods: the named methods trained and evaluated again with ``quantdream compare`` on the report's
    subjects, model, seed and images per prompt (OUT/refresh/<subject>); their mean rows replace the old ones
    (memory columns kept: the memory bench does not depend on the training defaults), the other rows are kept.
    Bars are computed again where they involve a refreshed method; a per-subject count that would need an old,
    unkept per-subject row of another method is left out (None) with a note."""
    from quantdream.bench.memory import _git_revision
    from quantdream.cli.compare import parse_methods
    from quantdream.eval import report as rep
    out = Path(a.out)
    try:
        old, keep = read_report(out, "--refresh-methods")
        try:
            methods = parse_methods(a.refresh_methods)
        except ValueError as e:                                      # name the flag the user gave
            raise ValueError(f"--refresh-methods: {str(e).removeprefix('--methods: ')}") from None
        have = [r["method"] for r in old["rows"]]
        if [m for m in methods if m not in have]:
            raise ValueError(f"--refresh-methods: {', '.join(m for m in methods if m not in have)} not in the report "
                             f"(it has {', '.join(have)})")
        subjects = subject_dirs(argparse.Namespace(subjects_dir=a.subjects_dir, subjects=",".join(keep["subjects"])))
    except ValueError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    sub = argparse.Namespace(**{**vars(a), "methods": ",".join(methods), "model": keep["model"], "seed": keep["seed"],
                                "images_per_prompt": keep["images_per_prompt"]})
    tables, failed = {}, {}
    for i, subject in enumerate(subjects, 1):
        print(f"comparison: refresh {i}/{len(subjects)}: {subject.name}", file=sys.stderr, flush=True)
        rc, report = compare_subject(sub, subject, out / "refresh" / subject.name)
        if rc in (2, 130):
            print(json.dumps({"error": f"compare stopped on {subject.name} (exit {rc}, see stderr); "
                                       f"nothing in the report changed{'; rerun with --resume' if rc == 130 else ''}"}))
            return rc
        if rc or report is None:
            failed[subject.name] = f"compare exited with {rc} (see stderr)"
            continue
        tables[subject.name] = report["rows"]
    if failed:                              # a mean over fewer subjects would not be the report's column
        print(json.dumps({"error": f"--refresh-methods: failed on {', '.join(failed)}; nothing in the report changed",
                          "failed_subjects": failed}))
        return 1
    new = {r["method"]: r for r in rep.mean_rows(list(tables.values()))}
    rows = [{**new[r["method"]], **{k: v for k, v in r.items() if k.startswith("memory_")}} if r["method"] in new
            else r for r in old["rows"]]
    means = {r["method"]: {k: r.get(k) for k in COLUMNS} for r in rows}
    fid = rep.fidelity_key(rows)
    bars = {**old.get("bars", {}), **memory_bars(rows)}
    for name, pair, fn in (("gfti_below_zoodip", ("zoodip", "gf-ti"), gfti_below_zoodip),
                           ("tuneqdm_s2_vs_peqa", ("tuneqdm-s2", "peqa"), tuneqdm_s2_vs_peqa)):
        if set(pair) & set(methods):
            bars[name] = fn(means, tables, fid)
            if not set(pair) <= set(methods):
                count = [k for k in bars[name] if k.startswith("subjects")]
                bars[name].update({k: None for k in count},
                                  note=f"per-subject counts left out: the original per-subject rows of "
                                       f"{', '.join(sorted(set(pair) - set(methods)))} are not kept in the report")
    for k in ("memory_arch", "memory_steps", "memory_low_memory"):      # the report's, not this call's defaults
        setattr(a, k, old["settings"].get(k, getattr(a, k)))
    mem_path = memory_path(a, out)
    memory = json.loads(mem_path.read_text()) if mem_path.is_file() else None
    automatic = ("train memory:", "in-run peak:") if memory else ()      # written again from memory.json
    notes = [n for n in old.get("notes", []) if not (automatic and n.startswith(automatic))] + [
        f"{', '.join(methods)}: trained and evaluated again (--refresh-methods, commit {_git_revision()}, runs in "
        f"{out / 'refresh'}); every other method's columns come from the original runs"]
    write_report(a, out, rows, memory, bars, keep, [], notes)
    print(json.dumps(result_json(a, out, rows, memory, bars, keep["subjects"], {}, {}), indent=1, default=str))
    return 0


def result_json(a, out: Path, rows, memory, bars, subjects, failed_subjects, reports) -> dict:
    from quantdream.eval import report as rep
    means = {r["method"]: {k: r.get(k) for k in COLUMNS} for r in rows}
    return {
        "benchmark": "comparison", "model": a.model, "subjects": subjects, "failed_subjects": failed_subjects,
        "methods": [r["method"] for r in rows], "fidelity_metric": rep.fidelity_key(rows),
        "steps": {m: means[m]["steps"] for m in means},
        "means": means,
        "memory": None if memory is None else {
            "arch": a.memory_arch, "low_memory": a.memory_low_memory, "summary": memory.get("summary"),
            "rows": {r["method"]: {"status": r["status"], "weights": r.get("weights"), "note": r.get("note"),
                                   "training_peak": r.get("training_peak"),
                                   "whole_process_peak_mib": r.get("whole_process_peak_mib"),
                                   "storage_bytes": r.get("storage_bytes"),
                                   "seconds_per_step": r.get("seconds_per_step"),
                                   "unet_forward_passes_per_step": r.get("unet_forward_passes_per_step")}
                     for r in memory["rows"]}},
        "bars": bars,
        "report": str(out / "report.md"), "subject_reports": reports,
    }


if __name__ == "__main__":
    sys.exit(main())
