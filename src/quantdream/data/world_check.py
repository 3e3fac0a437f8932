"""Are the photos of the embedded model's world? A cheap check before training on ``--model tiny``.

The embedded model only draws its world (one or two Fashion-MNIST items, colourized, on a patterned
background; quantdream.world). The packaged world reader (eval.reader) was trained on that world
only, so on its renders it is sure of the scene's layout, and on other photos it is not:

    score = mean over photos and over the heads (n_objects, bg_pattern, bg_colour, position)
            of the reader's top softmax probability

Measured on the packaged evaluator: the 10 example subjects (examples/subjects) score 0.935-0.974
per folder; the 30 DreamBooth photo subjects (real photos, 4-6 each) score 0.539-0.895. Below
``THRESHOLD`` (0.915, between the two) the run warns and points to ``--model PATH``; it never
refuses (a user may mean it). The class and size heads are left out: the reader names a class for
almost anything, and "large" for any photo filling the frame.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HEADS = ("n_objects", "bg_pattern", "bg_colour", "position")
THRESHOLD = 0.915


def world_score(photos: list[Path] | torch.Tensor, evaluator=None) -> float | None:
    """Score of photo files, or of images (N, 3, H, W) in [-1, 1]; None when no world reader is packaged.
    Files are read as training reads them (dataset.load_images) at the world's 64 px."""
    from ..eval.evaluator import Evaluator
    from ..eval.io import ASSET_DIR
    from ..world.render import RES
    from .dataset import load_images
    pixels = photos if isinstance(photos, torch.Tensor) else load_images(list(photos), RES)
    if evaluator is None:
        if not (ASSET_DIR / "reader.safetensors").is_file():
            return None
        evaluator = Evaluator(ASSET_DIR)
    logits = evaluator.read_logits(pixels.float().clamp(-1, 1))
    top = torch.stack([torch.softmax(logits[k].float(), -1).max(-1).values for k in HEADS])
    return float(top.mean())


def warn_if_not_world(photos: list[Path] | torch.Tensor, folder: str, evaluator=None) -> bool:
    """Log a warning (and return True) when the photos do not look like the embedded model's world."""
    score = world_score(photos, evaluator)
    if score is None or score >= THRESHOLD:
        return False
    logger.warning("warning: the photos in %s do not look like the embedded model's world (world-reader "
                   "confidence %.2f < %.2f): the embedded model ('--model tiny') only draws its Fashion-MNIST "
                   "world and cannot learn real photos; pass --model PATH to a Stable Diffusion folder or "
                   "checkpoint", folder, score, THRESHOLD)
    return True
