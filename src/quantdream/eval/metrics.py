"""Metrics: pure functions of features and attribute records (the extractors live in ``evaluator.py``).

    clip_i(gen, ref)       mean cosine over all generated x reference image pairs (CLIP-I; DINO/EffNet alike)
    clip_t(img, txt)       mean cosine of each image with its prompt (CLIP-T)
    prompt_accuracy(pred, named)  per-attribute accuracy over the attributes each prompt names
    reader_accuracy(pred, true)   per-attribute accuracy of a reader against full scene records
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# the attributes the overall score averages; background = bg_pattern and bg_colour, each as named
MAIN_ATTRIBUTES = ("class", "colour", "background", "position", "size")
BACKGROUND_PARTS = ("bg_pattern", "bg_colour")


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: (N, D), b: (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def clip_i(gen_feats: torch.Tensor, ref_feats: torch.Tensor) -> float:
    """CLIP-I (DreamBooth, Ruiz et al. 2023 §4.1): mean pairwise cosine between every generated image and
    every reference image of the subject. Also the DINO metric when given DINO (here EffNet) features.
    gen_feats: (N, D), ref_feats: (M, D)."""
    if gen_feats.ndim != 2 or ref_feats.ndim != 2 or gen_feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(f"clip_i needs (N, D) and (M, D) features, got {tuple(gen_feats.shape)} and {tuple(ref_feats.shape)}")
    return float(pairwise_cosine(gen_feats, ref_feats).mean())


def self_similarity(feats: torch.Tensor) -> float:
    """Mean cosine over distinct pairs within one set (N, D): a subject's photos among themselves (the ceiling)."""
    n = len(feats)
    if n < 2:
        raise ValueError(f"self_similarity needs at least 2 feature rows, got {n}")
    s = pairwise_cosine(feats, feats)
    return float((s.sum() - s.diagonal().sum()) / (n * (n - 1)))


def clip_t(img_feats: torch.Tensor, txt_feats: torch.Tensor) -> float:
    """CLIP-T (Gal et al. 2023; Ruiz et al. 2023): mean cosine between each image and the prompt that made it.
    img_feats: (N, D); txt_feats: (N, D) row-paired, or (1, D) for one prompt shared by all images."""
    if txt_feats.shape[0] not in (1, img_feats.shape[0]) or img_feats.shape[1] != txt_feats.shape[1]:
        raise ValueError(f"clip_t needs (N, D) image and (N, D) or (1, D) text features, "
                         f"got {tuple(img_feats.shape)} and {tuple(txt_feats.shape)}")
    return float((F.normalize(img_feats.float(), dim=-1) * F.normalize(txt_feats.float(), dim=-1)).sum(-1).mean())


def _correct(pred: dict, named: dict) -> dict[str, bool]:
    """Which of the attributes ``named`` names does ``pred`` get right. A key the reader did not produce
    (e.g. position when it sees two objects) counts as wrong."""
    out = {}
    for k in ("class", "colour", "size", "position", "class2", "colour2"):
        if k in named:
            out[k] = pred.get(k) == named[k]
    bg = [k for k in BACKGROUND_PARTS if k in named]
    if bg:
        out["background"] = all(pred.get(k) == named[k] for k in bg)
    return out


def prompt_accuracy(predictions: Sequence[dict], named_attributes: Sequence[dict]) -> dict:
    """Per-attribute accuracy of read images against the attributes their prompts name.

    predictions: one dict per image (``Evaluator.read``); named_attributes: the ``named`` dict of each
    image's prompt (``quantdream.world.captions.caption``), same order. An attribute is scored only on
    the images whose prompt names it; background is right only if every named part (pattern, colour)
    is. Returns {attribute: accuracy} for class, colour, background, position, size, class2, colour2
    (those named at least once), ``overall`` = mean over the named ones of class, colour, background,
    position, size, and ``counts`` = {attribute: number of images scored}.
    """
    if len(predictions) != len(named_attributes):
        raise ValueError(f"got {len(predictions)} predictions but {len(named_attributes)} prompts' attributes")
    hits: dict[str, list[bool]] = {}
    for pred, named in zip(predictions, named_attributes):
        for k, ok in _correct(pred, named).items():
            hits.setdefault(k, []).append(ok)
    order = list(MAIN_ATTRIBUTES) + ["class2", "colour2"]
    acc = {k: sum(hits[k]) / len(hits[k]) for k in order if k in hits}
    main = [acc[k] for k in MAIN_ATTRIBUTES if k in acc]
    acc["overall"] = sum(main) / len(main) if main else float("nan")
    acc["counts"] = {k: len(hits[k]) for k in order if k in hits}
    return acc


def reader_accuracy(predictions: Sequence[dict], truths: Sequence[dict]) -> dict:
    """Accuracy of the attribute reader against full scene records (``Scene.attributes()``).

    Per head (n_objects, class, colour, size, position, bg_pattern, bg_colour, class2, colour2; size and
    position over single-object scenes, class2/colour2 over two-object ones), ``background`` (both parts
    right) and ``average`` = mean over class, colour, background, position, size (the evaluator's bar)."""
    full = [dict(t) for t in truths]
    acc = prompt_accuracy(predictions, full)
    out = {k: v for k, v in acc.items() if k not in ("overall", "counts")}
    for k in ("n_objects",) + BACKGROUND_PARTS:
        out[k] = sum(p.get(k) == t[k] for p, t in zip(predictions, full)) / len(full)
    out["average"] = acc["overall"]
    out["counts"] = acc["counts"]
    return out
