"""Measurements of a text-to-image pipeline in the world: prompt accuracy on held-out captions, the
reader on rendered and autoencoded images, and each subject's room to learn (ceiling vs floor).
Used by ``benchmarks/embedded_model.py``, ``benchmarks/quantization.py`` and ``quantdream evaluate``."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..models.sample import generate_images, to_uint8
from ..world.captions import caption
from ..world.render import render_batch, sample_scene
from .metrics import clip_i, prompt_accuracy, reader_accuracy, self_similarity

HELD_OUT_SEED = 99  # the generator trains on seeds 0/1, the evaluator on its own: captions drawn here are new draws


def held_out_captions(n: int = 200, seed: int = HELD_OUT_SEED) -> list[tuple[str, dict]]:
    """``n`` random captions (with the training grammar's dropped parts) and the attributes each names."""
    from ..world.fmnist import load_fmnist
    try:
        _, labels = load_fmnist("test")
    except FileNotFoundError:  # captions do not need the items themselves
        labels = np.arange(10000) % 10
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append(caption(sample_scene(rng, labels, split="test"), rng))
    return out


def measure_prompt_accuracy(pipe, evaluator, captions: list[tuple[str, dict]], n_images: int = 4, seed: int = 0,
                            steps: int = 25, guidance: float = 4.0, grid_path: str | Path | None = None) -> dict:
    """Generate ``n_images`` per caption, read them, and score the named attributes."""
    prompts = [c for c, _ in captions]
    rows = generate_images(pipe, prompts, n_images, seed, steps, guidance)
    imgs = to_uint8([im for row in rows for im in row])
    named = [n for _, n in captions for _ in range(n_images)]
    acc = prompt_accuracy(evaluator.read(imgs), named)
    if grid_path is not None:
        from ..models.sample import make_grid
        make_grid(rows[:16]).save(grid_path)
    return acc


def reads_on_world(evaluator, vae=None, n: int = 1000, seed: int = HELD_OUT_SEED + 1) -> dict:
    """The reader's per-image reads of ``n`` rendered test-split scenes ("real") and (with ``vae``) of their
    reconstructions ("reconstructed"), with the scenes' full records ("truths")."""
    from ..world.fmnist import load_fmnist
    items, labels = load_fmnist("test")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, labels, split="test") for _ in range(n)]
    imgs = render_batch(scenes, items)
    out = {"truths": [s.attributes() for s in scenes], "real": evaluator.read(imgs)}
    if vae is not None:
        recs = []
        with torch.no_grad():
            for k in range(0, n, 100):
                x = torch.from_numpy(imgs[k:k + 100]).permute(0, 3, 1, 2).float().to(vae.device, vae.dtype) / 127.5 - 1
                recs.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1).cpu())
        out["reconstructed"] = evaluator.read(torch.cat(recs))
    return out


def reader_on_world(evaluator, vae=None, n: int = 1000, seed: int = HELD_OUT_SEED + 1) -> dict:
    """Reader accuracy on rendered test-split images and (with ``vae``) on their reconstructions."""
    reads = reads_on_world(evaluator, vae, n, seed)
    return {k: reader_accuracy(reads[k], reads["truths"]) for k in ("real", "reconstructed") if k in reads}


def subject_room(pipe, evaluator, subject: dict, n_images: int = 8, seed: int = 0, steps: int = 25,
                 guidance: float = 4.0) -> dict:
    """Ceiling: mean similarity among the subject's own photos. Floor: similarity between its photos and
    images generated from its class word alone (no personalization). World CLIP-I and EfficientNet."""
    from PIL import Image
    photos = [Image.open(Path(subject["dir"]) / p["file"]).convert("RGB") for p in subject["photos"]]
    ref = to_uint8(photos)
    gen = to_uint8(generate_images(pipe, [f"a {subject['class_word']}"], n_images, seed, steps, guidance)[0])
    out = {}
    for name, f in (("clip_i", evaluator.clip_image), ("effnet", evaluator.effnet)):
        r, g = f(ref), f(gen)
        out[name] = {"ceiling": self_similarity(r), "floor": clip_i(g, r)}
    return out


def seconds_per_image(pipe, steps: int = 25, guidance: float = 4.0, repeats: int = 5) -> float:
    """Wall time of one image (batch 1), after one warm-up call."""
    generate_images(pipe, ["a red bag"], 1, 0, steps, guidance)
    t = time.perf_counter()
    for i in range(repeats):
        generate_images(pipe, ["a large blue sneaker on a striped yellow background"], 1, i, steps, guidance)
    return (time.perf_counter() - t) / repeats
