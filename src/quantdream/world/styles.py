"""Rendering styles of the embedded world: what a style-personalization run learns from a few photos.

A style is a deterministic, exact function of a rendered scene (its uint8 RGB image and its object mask),
chosen to be plainly visible at 64 px:

    pastel     every colour pulled toward white, then toward its own grey: light, low saturation
               x' = w + (1 - a) (x - w), then x'' = g(x') + (1 - d) (x' - g(x'))    (w white, g the pixel's mean)
    outlined   a dark ring of ``width`` px drawn just outside the object mask (mask dilated minus mask)
    pixelated  every k x k block replaced by its mean colour

    python -m quantdream.world.styles make --out examples/styles

writes ``<out>/<name>/{00..04}.png`` (5 varied test-split scenes in that style) and ``style.json`` (name,
parameters, the scene record of each photo, how they were made). Style runs caption the photos with the
style templates (``--learnable-property style``), so no captions.json is written.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .render import CLASSES, COLOUR_NAMES, PATTERNS, POSITIONS, RES, Obj, Scene, render
from .subjects import load_folder_meta

WHITE = 255.0
OUTLINE_RGB = (16, 16, 16)


@dataclass(frozen=True)
class Style:
    """A named rendering style and its parameters."""
    name: str
    params: dict = field(default_factory=dict)
    description: str = ""


STYLES = {
    "pastel": Style("pastel", {"lighten": 0.55, "desaturate": 0.4},
                    "colours pulled 55% toward white, then 40% toward their own grey"),
    "outlined": Style("outlined", {"width": 2, "rgb": list(OUTLINE_RGB), "mask_threshold": 0.5},
                      "a 2 px near-black ring just outside the object mask"),
    "pixelated": Style("pixelated", {"k": 5}, "every 5 x 5 block replaced by its mean colour (13 x 13 blocks)"),
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def pastel(img: np.ndarray, lighten: float = 0.55, desaturate: float = 0.4) -> np.ndarray:
    """x' = 255 - (1 - a)(255 - x); x'' = mean(x') + (1 - d)(x' - mean(x')) per pixel."""
    x = img.astype(np.float64)
    x = WHITE - (1.0 - lighten) * (WHITE - x)
    g = x.mean(axis=-1, keepdims=True)
    return _to_uint8(g + (1.0 - desaturate) * (x - g))


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1) x (2r+1) square, exact (no wrap-around at the borders)."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def outline_ring(mask: np.ndarray, width: int = 2, mask_threshold: float = 0.5) -> np.ndarray:
    """The pixels within ``width`` px outside the object: dilate(m, width) & ~m, m = mask > threshold."""
    m = mask > mask_threshold
    return dilate(m, width) & ~m


def outlined(img: np.ndarray, mask: np.ndarray, width: int = 2, rgb=OUTLINE_RGB, mask_threshold: float = 0.5) -> np.ndarray:
    out = img.copy()
    out[outline_ring(mask, width, mask_threshold)] = np.asarray(rgb, dtype=np.uint8)
    return out


def pixelated(img: np.ndarray, k: int = 5) -> np.ndarray:
    """Each k x k block from the top left -> its mean colour (the last row and column of blocks are
    narrower when k does not divide the side). k = 5 on purpose: the world's background patterns repeat
    every 4 or 8 px, so a 5 px grid is one no plain render lines up with."""
    h, w, _ = img.shape
    by, bx = np.arange(h) // k, np.arange(w) // k                       # block index of each row / column
    x = img.astype(np.float64)
    sums = np.zeros((by[-1] + 1, bx[-1] + 1, 3))
    np.add.at(sums, (by[:, None], bx[None, :]), x)
    counts = np.bincount(by)[:, None] * np.bincount(bx)[None, :]
    return _to_uint8((sums / counts[..., None])[by[:, None], bx[None, :]])


def apply_style(name: str, img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``img`` (H, W, 3) uint8 in style ``name``; ``outlined`` needs the scene's object ``mask`` (H, W)."""
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; choose from {', '.join(STYLES)}")
    p = STYLES[name].params
    if name == "pastel":
        return pastel(img, p["lighten"], p["desaturate"])
    if name == "pixelated":
        return pixelated(img, p["k"])
    if mask is None:
        raise ValueError("the outlined style needs the object mask (render(..., return_mask=True))")
    return outlined(img, mask, p["width"], tuple(p["rgb"]), p["mask_threshold"])


def render_styled(scene: Scene, items: np.ndarray, name: str) -> np.ndarray:
    """Render ``scene`` and apply style ``name``."""
    img, mask = render(scene, items, return_mask=True)
    return apply_style(name, img, mask)


# ----------------------------------------------------------------------------- the example photos
def style_scenes(rng: np.random.Generator, labels: np.ndarray, n: int = 5) -> list[Scene]:
    """n varied single-object scenes of the test split: n different classes, object colours, backgrounds
    (every pattern once), positions; mostly large, the last one small. Object and background colours differ
    and neither is white or black, so each style has colour to work on."""
    mid = [c for c in range(10) if COLOUR_NAMES[c] not in ("white", "black")]
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    pats = rng.permutation(len(PATTERNS))
    pos = rng.choice(len(POSITIONS), size=n, replace=False)
    scenes = []
    for i in range(n):
        colour = int(rng.choice(mid))
        bg = int(rng.choice([c for c in mid if c != colour]))
        cls = int(classes[i])
        obj = Obj(cls=cls, item=int(rng.choice(np.flatnonzero(labels == cls))), colour=colour)
        scenes.append(Scene(objects=[obj], size=0 if i == n - 1 else 1, position=int(pos[i]),
                            bg_pattern=int(pats[i % len(PATTERNS)]), bg_colour=bg,
                            jitter=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))),
                            stripe_dir=int(rng.integers(3)), split="test"))
    return scenes


def style_photos(name: str, items: np.ndarray, labels: np.ndarray, seed: int = 2026) -> tuple[list[np.ndarray], list[Scene]]:
    """The example photos of style ``name`` (and their scenes): each style gets its own scenes."""
    rng = np.random.default_rng([seed, list(STYLES).index(name)])
    scenes = style_scenes(rng, labels)
    return [render_styled(sc, items, name) for sc in scenes], scenes


def write_styles(out: str | Path, fmnist: str | None = None, seed: int = 2026,
                 names: list[str] | None = None) -> list[Path]:
    """Write ``<out>/<style>/{00..04}.png`` and ``style.json`` for every style (or ``names``)."""
    from .fmnist import load_fmnist
    items, labels = load_fmnist("test", fmnist)
    written = []
    for name in names or list(STYLES):
        photos, scenes = style_photos(name, items, labels, seed)
        d = Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        files = []
        for i, (img, sc) in enumerate(zip(photos, scenes)):
            fn = f"{i:02d}.png"
            Image.fromarray(img).save(d / fn, optimize=True)
            files.append({"file": fn, "class": CLASSES[sc.objects[0].cls], "scene": sc.to_dict()})
        st = STYLES[name]
        meta = {"name": name, "params": st.params, "description": st.description, "resolution": RES,
                "fmnist_split": "test", "seed": seed, "init_word": "painting",
                "made_with": f"python -m quantdream.world.styles make --out <folder> --seed {seed}",
                "photos": files}
        (d / "style.json").write_text(json.dumps(meta, indent=1) + "\n")
        written.append(d)
    return written


def load_style(path: str | Path) -> dict:
    """Read ``style.json`` of a style folder, with a clear error when it is not one."""
    return load_folder_meta(path, "style")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m quantdream.world.styles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write the example style photos")
    mk.add_argument("--out", default="examples/styles")
    mk.add_argument("--fmnist", default=None, help="folder with the Fashion-MNIST *.gz files")
    mk.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args(argv)
    for d in write_styles(a.out, a.fmnist, a.seed):
        print(d)


if __name__ == "__main__":
    main()
