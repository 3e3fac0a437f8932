"""An embedding written by quantdream renders its subject in a stock diffusers pipeline. Prints ONE JSON object.

    python benchmarks/stock_pipeline.py                              # the zoodip runs of benchmarks/personalization.py
    python benchmarks/stock_pipeline.py --runs out/bench_personalization/runs --variant ti --images-per-prompt 4

For each subject's run: a plain ``StableDiffusionPipeline.from_pretrained`` of the embedded model (float, no
quantdream code in the pipeline; DDIM as the README samples, via quantdream's seeded sampling helper), once
with the init word and once after the stock
``pipe.load_textual_inversion(run)`` with the token, same prompts and seeds. Both are scored with the world
evaluator against the subject's photos. The bar: the token's world CLIP-I is above the init word's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("world_clip_i", "subject_attr_acc", "effnet", "world_clip_t", "prompt_accuracy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="out/bench_personalization/runs", help="RUNS/<subject>/<variant>/")
    ap.add_argument("--variant", default="zoodip")
    ap.add_argument("--subjects-dir", dest="subjects_dir", default=str(ROOT / "examples" / "subjects"))
    ap.add_argument("--images-per-prompt", dest="n", type=int, default=2)
    ap.add_argument("--prompts", default="context", help="prompt kinds (default context: the subject unchanged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from diffusers import StableDiffusionPipeline
    from quantdream.eval.protocol import load_encoders, parse_kinds, reference_images, score, select_prompts
    from quantdream.models.load import SAMPLING_DEFAULTS, resolve_model
    from quantdream.models.sample import generate_images
    from quantdream.world.subjects import load_subject
    torch.set_num_threads(args.threads)
    steps, guidance = SAMPLING_DEFAULTS["tiny"]
    model = resolve_model("tiny")
    enc = load_encoders()
    runs = sorted(p for p in Path(args.runs).glob(f"*/{args.variant}") if (p / "learned_embeds.safetensors").is_file())
    if not runs:
        print(f"no finished {args.variant} runs under {args.runs}", file=sys.stderr)
        return 2
    rows = {}
    for run in runs:
        name = run.parent.name
        subj = load_subject(Path(args.subjects_dir) / name)
        subj["dir"] = str(Path(args.subjects_dir) / name)
        prompts = select_prompts(subj, parse_kinds(args.prompts))
        ref = reference_images(subj)
        token = json.loads((run / "run.json").read_text())["token"]
        pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        base = generate_images(pipe, [p["prompt"].format(subj["class_word"]) for p in prompts], args.n, args.seed,
                               steps, guidance)
        pipe.load_textual_inversion(str(run))                                   # the stock loader
        tok = generate_images(pipe, [p["prompt"].format(token) for p in prompts], args.n, args.seed, steps, guidance)
        r = {"init_word": score(base, prompts, subj["class_word"], ref, enc, subj),
             "token": score(tok, prompts, subj["class_word"], ref, enc, subj)}
        r = {k: {m: v[m] for m in METRICS if m in v} for k, v in r.items()}
        r["renders_subject"] = r["token"]["world_clip_i"] > r["init_word"]["world_clip_i"]
        rows[name] = r
        print(f"{name}: world CLIP-I init word {r['init_word']['world_clip_i']:.3f} -> token "
              f"{r['token']['world_clip_i']:.3f}", file=sys.stderr)
    mean = {k: {m: sum(r[k][m] for r in rows.values()) / len(rows) for m in METRICS if m in next(iter(rows.values()))[k]}
            for k in ("init_word", "token")}
    out = {"variant": args.variant, "pipeline": "diffusers.StableDiffusionPipeline.from_pretrained + load_textual_inversion",
           "images_per_prompt": args.n, "prompts": args.prompts, "steps": steps, "guidance": guidance,
           "subjects": rows, "mean": mean,
           "bar_renders_subject_every_subject": all(r["renders_subject"] for r in rows.values()),
           "bar_renders_subject_mean": mean["token"]["world_clip_i"] > mean["init_word"]["world_clip_i"]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
