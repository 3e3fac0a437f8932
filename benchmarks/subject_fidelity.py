"""Floor and ceiling of subject attribute accuracy beside world CLIP-I, per example subject. Prints one JSON object.

    python benchmarks/subject_fidelity.py                                   # 10 subjects, every prompt x 4 images
    python benchmarks/subject_fidelity.py --subjects teal_bag --images-per-prompt 1

For each subject:
    floor     every prompt of the subject with its class word (the init word: no personalization), rendered
              and scored as ``quantdream evaluate --baseline`` scores its baseline row (same seeds)
    ceiling   the subject's photos: world CLIP-I among themselves, subject attribute accuracy of the photos
    cases     hand-made renders in the scenes of its photos (``subject_attr.contrast_cases``): what the
              metric says of the class word, a wrong print, a wrong colour, another item, the photos
The room a method has to learn is ceiling - floor; ``benchmarks/personalization.py`` reports each
variant's share of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("world_clip_i", "subject_attr_acc")


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="", help="comma-separated names under examples/subjects (default all)")
    ap.add_argument("--model", default="tiny", help="text-to-image model (default: the embedded model)")
    ap.add_argument("--images-per-prompt", dest="images_per_prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--evaluator", default=None, help="evaluator folder (default: the packaged one)")
    a = ap.parse_args(argv)
    root = ROOT / "examples" / "subjects"
    names = [n for n in a.subjects.split(",") if n] or sorted(p.name for p in root.iterdir() if (p / "subject.json").is_file())
    missing = [n for n in names if not (root / n / "subject.json").is_file()]
    if missing:
        raise SystemExit(f"no example subject {missing}; choose from {', '.join(sorted(p.name for p in root.iterdir()))}")
    if a.images_per_prompt < 1:
        raise SystemExit(f"--images-per-prompt must be >= 1, got {a.images_per_prompt}")
    import torch
    torch.set_num_threads(a.threads)
    from quantdream.eval.protocol import load_encoders, reference_images, score, select_prompts, subject_ceiling
    from quantdream.eval.subject_attr import contrast_cases, subject_attribute_accuracy
    from quantdream.models.load import SAMPLING_DEFAULTS, is_tiny, load_pipeline, resolve_model
    from quantdream.models.sample import generate_images
    from quantdream.world.fmnist import load_fmnist
    from quantdream.world.subjects import load_subject
    items, labels = load_fmnist("test")
    enc = load_encoders(a.evaluator)
    pipe = load_pipeline(a.model)
    steps, guidance = SAMPLING_DEFAULTS["tiny" if is_tiny(resolve_model(a.model)) else "sd"]
    t0 = time.perf_counter()
    per = {}
    for name in names:
        subj = load_subject(root / name)
        prompts = select_prompts(subj, None)
        texts = [p["prompt"].format(subj["class_word"]) for p in prompts]
        images = generate_images(pipe, texts, a.images_per_prompt, a.seed, steps, guidance)
        reference = reference_images(subj)
        floor = score(images, prompts, subj["class_word"], reference, enc, subj)
        ceiling = subject_ceiling(reference, enc, subj)
        cases = {k: subject_attribute_accuracy(v, subj["object"], items)["subject_attr_acc"]
                 for k, v in contrast_cases(subj, items, labels, seed=a.seed).items()}
        per[name] = {"floor": {k: floor.get(k) for k in METRICS}, "floor_parts": floor.get("subject_attr_parts"),
                     "ceiling": {k: ceiling.get(k) for k in METRICS}, "cases": cases}
        print(f"{name}: floor {per[name]['floor']}, ceiling {per[name]['ceiling']}", file=sys.stderr)
    res = {"model": a.model, "subjects": names, "images_per_prompt": a.images_per_prompt, "seed": a.seed,
           "steps": steps, "guidance": guidance, "seconds": round(time.perf_counter() - t0, 1),
           "floor": {k: mean(p["floor"][k] for p in per.values()) for k in METRICS},
           "ceiling": {k: mean(p["ceiling"][k] for p in per.values()) for k in METRICS},
           "cases": {c: mean(p["cases"][c] for p in per.values()) for c in next(iter(per.values()))["cases"]},
           "per_subject": per}
    res["room"] = {k: res["ceiling"][k] - res["floor"][k] for k in METRICS
                   if res["ceiling"][k] is not None and res["floor"][k] is not None}
    res["ceiling_above_floor_on_every_subject"] = {
        k: all(p["ceiling"][k] is not None and p["floor"][k] is not None and p["ceiling"][k] > p["floor"][k]
               for p in per.values()) for k in METRICS}
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
