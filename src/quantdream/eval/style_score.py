"""How strongly an image shows one of the world's rendering styles (world/styles.py): a score in [0, 1]
computed exactly from its pixels, with no network.

    pastel     the share of pixels that are light and pale: min(R, G, B) >= 0.5 and saturation
               (max - min) / max <= 0.35 (a pastel render's darkest channel is at least 0.55 white)
    pixelated  the share of the image's first-difference energy that sits on a k x k block grid (k = 5):
               f = sum of d^2 across block borders / sum of d^2 (best grid offset, both axes);
               a block-constant image has f = 1, a smooth one about 1/k; score = (f - 1/k) / (1 - 1/k)
    outlined   the share of dark strong edges that border a thin dark line: E = strong edges (|grad L| >= 0.25,
               L the luminance) within 1 px of a dark pixel (L <= 0.2); a line pixel is dark with a pixel
               brighter by >= 0.12 within 3 px on both sides along a row or a column;
               score = |E near a line| / (|E| + 16), the 16 px keeping images with few dark edges near 0
               (background patterns without dark pixels do not dilute it)
Each style's photos score high and plain renders of the same scenes low (tests/test_styles.py); the
numbers are meant for comparing methods on the same prompts and seeds, not as absolute truths.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PASTEL_MIN_CHANNEL = 0.5
PASTEL_MAX_SATURATION = 0.35
EDGE = 0.25             # strong-edge threshold on luminance differences (central, in [0, 1] units)
DARK = 0.2              # a line pixel's luminance is at most this
CONTRAST = 0.12        # its flanks are brighter by at least this
REACH = 3               # ... within this many pixels on each side
OUTLINE_PRIOR = 16      # edge pixels added to the outlined score's denominator


def as_float(image) -> np.ndarray:
    """A PIL image, a path or an (H, W, 3) uint8 array -> float (H, W, 3) in [0, 1]."""
    from PIL import Image
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"a style score needs an RGB image (H, W, 3), got shape {x.shape}")
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def luminance(x: np.ndarray) -> np.ndarray:
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def pastel_score(image) -> float:
    x = as_float(image)
    hi, lo = x.max(-1), x.min(-1)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0)
    return float(((lo >= PASTEL_MIN_CHANNEL) & (sat <= PASTEL_MAX_SATURATION)).mean())


def block_grid_fraction(image, k: int = 5) -> float:
    """f: the share of squared first differences (rows and columns, all channels) that lie across the
    borders of a k x k grid, at the grid offset that gives the most (0 for a flat image)."""
    x = as_float(image)
    dx = ((x[:, 1:] - x[:, :-1]) ** 2).sum(axis=(0, 2))      # (W-1,) energy between column j and j+1
    dy = ((x[1:] - x[:-1]) ** 2).sum(axis=(1, 2))            # (H-1,)
    total = dx.sum() + dy.sum()
    if total <= 0:
        return 0.0
    best_x = max(dx[o::k].sum() for o in range(k))           # borders after columns o, o + k, ...
    best_y = max(dy[o::k].sum() for o in range(k))
    return float((best_x + best_y) / total)


def pixelated_score(image, k: int = 5) -> float:
    f = block_grid_fraction(image, k)
    return float(np.clip((f - 1.0 / k) / (1.0 - 1.0 / k), 0.0, 1.0))


def _shift(a: np.ndarray, d: int, axis: int, fill: float) -> np.ndarray:
    """a shifted by d along axis (out[i] = a[i - d]), the new cells ``fill``."""
    out = np.full_like(a, fill)
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    if d > 0:
        src[axis], dst[axis] = slice(0, a.shape[axis] - d), slice(d, None)
    else:
        src[axis], dst[axis] = slice(-d, None), slice(0, a.shape[axis] + d)
    out[tuple(dst)] = a[tuple(src)]
    return out


def dark_lines(lum: np.ndarray) -> np.ndarray:
    """Pixels of thin dark lines: L <= DARK with a pixel brighter by CONTRAST within REACH px on both sides,
    along a row or a column."""
    line = np.zeros(lum.shape, dtype=bool)
    for axis in (0, 1):
        before = np.max([_shift(lum, t, axis, -1.0) for t in range(1, REACH + 1)], axis=0)
        after = np.max([_shift(lum, -t, axis, -1.0) for t in range(1, REACH + 1)], axis=0)
        line |= (before >= lum + CONTRAST) & (after >= lum + CONTRAST)
    return line & (lum <= DARK)


def strong_edges(lum: np.ndarray) -> np.ndarray:
    gx = np.zeros_like(lum)
    gy = np.zeros_like(lum)
    gx[:, 1:-1] = (lum[:, 2:] - lum[:, :-2]) / 2
    gy[1:-1] = (lum[2:] - lum[:-2]) / 2
    return np.hypot(gx, gy) >= EDGE / 2


def outlined_score(image) -> float:
    from ..world.styles import dilate
    lum = luminance(as_float(image))
    edges = strong_edges(lum) & dilate(lum <= DARK, 1)                 # strong edges with a dark side
    near_line = dilate(dark_lines(lum), 1)
    return float((edges & near_line).sum() / (edges.sum() + OUTLINE_PRIOR))


SCORES = {"pastel": pastel_score, "outlined": outlined_score, "pixelated": pixelated_score}


def style_score(image, style: str) -> float:
    """How strongly ``image`` shows ``style`` (pastel | outlined | pixelated), in [0, 1]."""
    if style not in SCORES:
        raise ValueError(f"no style score for {style!r}; choose from {', '.join(SCORES)}")
    return SCORES[style](image)


def mean_style_score(images, style: str) -> float:
    """The mean score of a list of images (or of lists of images, as generate_images returns them)."""
    flat = [im for row in images for im in (row if isinstance(row, (list, tuple)) else [row])]
    if not flat:
        raise ValueError("no images to score")
    return float(np.mean([style_score(im, style) for im in flat]))
