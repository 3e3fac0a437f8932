"""How a resumable v2 training run progresses: quick prompt accuracy of its exports, one row per snapshot.

A v2 run on the CPU spans many invocations, each exporting the EMA weights so far (``OUT/model``, with
``training.json`` naming the UNet step). This study reads such exports with the protocol of
``benchmarks/embedded_model.py`` (held-out captions, DDIM 25 steps, guidance 4, stock diffusers, the world's
attribute reader) on fewer captions, so that a point on the curve costs minutes, not half an hour:

    python benchmarks/studies/v2_progress.py MODEL [MODEL ...] --captions 40 --images 4 --threads 1
    python benchmarks/studies/v2_progress.py MODEL --guidance 4 7.5 10     # the sampler's guidance too
    python benchmarks/studies/v2_progress.py MODEL --autoencoder-only      # where the autoencoder loses class

Prints one JSON object: for each model (and guidance scale) its UNet step, samples seen, prompt accuracy and per-attribute accuracy,
and the share of generated images read as each class per caption class (where class goes wrong). The full
protocol (200 captions) is ``benchmarks/embedded_model.py``; this study only tracks a run between its exports.
``--autoencoder-only`` reads the 1000 rendered test-split scenes of ``reader_on_world`` and their reconstructions by
the model's autoencoder, and splits the reader's class accuracy by object count and size and by class: the class a
generated image can be read as is bounded by what its autoencoder keeps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch


def snapshot_info(model: Path) -> dict:
    """UNet step and samples seen, from the export's ``training.json``."""
    meta = json.loads((model / "training.json").read_text()) if (model / "training.json").is_file() else {}
    steps = meta.get("unet_steps")
    batch = meta.get("config", {}).get("unet_batch")
    return {"unet_steps": steps, "samples": steps * batch if steps is not None and batch else None}


def class_confusion(reads: list[dict], named: list[dict]) -> dict:
    """For each caption class, the share of its images the reader puts in each class."""
    by_class: dict[str, Counter] = defaultdict(Counter)
    for r, n in zip(reads, named):
        if "class" in n:
            by_class[n["class"]][r["class"]] += 1
    return {c: {k: round(v / sum(cnt.values()), 3) for k, v in cnt.most_common()} for c, cnt in sorted(by_class.items())}


def _class_table(keys: list[str], truths: list[dict], real: list[dict], rec: list[dict]) -> dict:
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for k, t, a, b in zip(keys, truths, real, rec):
        rows[k][0] += 1
        rows[k][1] += a["class"] == t["class"]
        rows[k][2] += b["class"] == t["class"]
    return {k: {"n": n, "real": round(x / n, 3), "reconstructed": round(y / n, 3)} for k, (n, x, y) in sorted(rows.items())}


def autoencoder_class(model: Path, evaluator) -> dict:
    """The reader's class accuracy on renders and on their reconstructions, by object count and size, by class."""
    from diffusers import AutoencoderKL

    from quantdream.eval.world_protocol import reads_on_world

    vae = AutoencoderKL.from_pretrained(str(model / "vae")).float()
    r = reads_on_world(evaluator, vae)          # the scenes of benchmarks/embedded_model.py's reader figures
    truths, real, read = r["truths"], r["real"], r["reconstructed"]
    sizes = [f"{t['n_objects']} object{'s' if t['n_objects'] > 1 else ''}" + (f", {t['size']}" if "size" in t else "")
             for t in truths]
    return {"all": _class_table(["all"] * len(truths), truths, real, read)["all"],
            "by_objects_and_size": _class_table(sizes, truths, real, read),
            "by_class": _class_table([t["class"] for t in truths], truths, real, read)}


def measure(model: Path, captions, n_images: int, steps: int, guidance: float, evaluator) -> dict:
    from diffusers import StableDiffusionPipeline

    from quantdream.eval.metrics import prompt_accuracy
    from quantdream.models.sample import generate_images, to_uint8

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    rows = generate_images(pipe, [c for c, _ in captions], n_images, 0, steps, guidance)
    reads = evaluator.read(to_uint8([im for row in rows for im in row]))
    named = [n for _, n in captions for _ in range(n_images)]
    acc = prompt_accuracy(reads, named)
    return {**snapshot_info(model), "prompt_accuracy": acc["overall"],
            "per_attribute": {k: v for k, v in acc.items() if k not in ("overall", "counts")},
            "class_read_as": class_confusion(reads, named), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="exported v2 folders (OUT/model of a run, or copies of it)")
    ap.add_argument("--captions", type=int, default=40)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance", type=float, nargs="+", default=None,
                    help="classifier-free guidance scales to try (default: the embedded model's sampling default)")
    ap.add_argument("--autoencoder-only", action="store_true",
                    help="only the reader's class accuracy on renders and their reconstructions (no generation)")
    a = ap.parse_args(argv)
    missing = [m for m in a.models if not (Path(m) / "model_index.json").is_file()]
    if missing:
        ap.error(f"not a diffusers folder (no model_index.json): {', '.join(missing)}")
    torch.set_num_threads(a.threads)
    from quantdream.eval import load_evaluator
    from quantdream.eval.world_protocol import held_out_captions
    from quantdream.models.load import SAMPLING_DEFAULTS

    ev = load_evaluator()
    if a.autoencoder_only:
        print(json.dumps({Path(m).name: {**snapshot_info(Path(m)), **autoencoder_class(Path(m), ev)}
                          for m in a.models}, indent=1))
        return 0
    steps, default_guidance = SAMPLING_DEFAULTS["tiny"]
    scales = a.guidance or [default_guidance]
    captions = held_out_captions(a.captions)
    res = {"protocol": f"{a.captions} held-out captions x {a.images} images, DDIM {steps} steps",
           "threads": a.threads, "snapshots": {}}
    for m in a.models:
        for g in scales:
            key = Path(m).name if a.guidance is None else f"{Path(m).name}@guidance={g:g}"
            res["snapshots"][key] = {"guidance": g, **measure(Path(m), captions, a.images, steps, g, ev)}
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
