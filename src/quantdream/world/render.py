"""The embedded world: attribute records -> 64x64 RGB images and captions.

A scene is one Fashion-MNIST item (or two), colourized, placed at a position and a size on a
patterned background. Every attribute a caption names is kept in the record, so a reader can
check it. Prints on the object (two-tone, stripes, dots) and exact shades are never named: they
are what a personal subject has that words cannot pin down.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

RES = 64  # image side in pixels; 64 keeps Fashion-MNIST's 28x28 detail at the large size

CLASSES = ["top", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
COLOURS = {
    "red": (215, 35, 35), "orange": (245, 135, 25), "yellow": (240, 215, 35), "green": (40, 160, 55),
    "blue": (35, 75, 215), "purple": (135, 55, 185), "pink": (245, 135, 195), "brown": (125, 75, 35),
    "white": (238, 238, 238), "black": (28, 28, 28),
}
COLOUR_NAMES = list(COLOURS)
PATTERNS = ["plain", "striped", "checkered", "dotted", "gradient"]
POSITIONS = ["center", "left", "right", "top", "bottom", "top left", "top right", "bottom left", "bottom right"]
SIZES = ["small", "large"]
PRINTS = ["solid", "twotone", "stripes", "dots"]
SIZE_PX = {"small": 22, "large": 38}
POSITION_PHRASE = {
    "center": "in the center", "left": "on the left", "right": "on the right",
    "top": "at the top", "bottom": "at the bottom", "top left": "at the top left",
    "top right": "at the top right", "bottom left": "at the bottom left", "bottom right": "at the bottom right",
}
# which attributes a caption can name; background = pattern + colour, both must be right
ATTRIBUTES = ["class", "colour", "background", "position", "size"]


@dataclass
class Obj:
    """One object. ``rgb``/``print_rgb`` override the palette (personal subjects use off-palette shades)."""
    cls: int
    item: int  # index into the item array of its split
    colour: int  # palette index: the colour word a caption would use
    rgb: tuple[int, int, int] | None = None
    print: str = "solid"
    print_rgb: tuple[int, int, int] | None = None
    print_phase: int = 0  # stripe/dot offset, part of a subject's identity


@dataclass
class Scene:
    objects: list[Obj]
    size: int  # index into SIZES (single-object scenes; two-object scenes are always small)
    position: int  # index into POSITIONS (single-object scenes)
    bg_pattern: int
    bg_colour: int
    bg_rgb: tuple[int, int, int] | None = None
    jitter: tuple[int, int] = (0, 0)  # pixel offset of the placement
    stripe_dir: int = 0  # 0 vertical, 1 horizontal, 2 diagonal (unnamed)
    split: str = "train"

    def attributes(self) -> dict:
        o = self.objects[0]
        rec = {"n_objects": len(self.objects), "class": CLASSES[o.cls], "colour": COLOUR_NAMES[o.colour],
               "bg_pattern": PATTERNS[self.bg_pattern], "bg_colour": COLOUR_NAMES[self.bg_colour]}
        if len(self.objects) == 1:
            rec.update(size=SIZES[self.size], position=POSITIONS[self.position])
        else:
            rec.update(class2=CLASSES[self.objects[1].cls], colour2=COLOUR_NAMES[self.objects[1].colour])
        return rec

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        d = dict(d)
        d["objects"] = [Obj(**{k: tuple(v) if isinstance(v, list) else v for k, v in o.items()}) for o in d["objects"]]
        for k in ("bg_rgb", "jitter"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return Scene(**d)


def _alt(c: np.ndarray) -> np.ndarray:
    """The second shade of a patterned background: darker for light colours, lighter for dark ones."""
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c * 0.62 if lum > 0.5 else c * 0.45 + 0.55


def render_background(pattern: int, rgb: np.ndarray, stripe_dir: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:RES, 0:RES]
    a, b = rgb, _alt(rgb)
    name = PATTERNS[pattern]
    if name == "plain":
        m = np.zeros((RES, RES))
    elif name == "striped":
        coord = [xx, yy, xx + yy][stripe_dir]
        m = ((coord // 4) % 2).astype(float)
    elif name == "checkered":
        m = (((xx // 8) + (yy // 8)) % 2).astype(float)
    elif name == "dotted":
        m = (((xx % 8) - 3.5) ** 2 + ((yy % 8) - 3.5) ** 2 <= 5.0).astype(float)
    elif name == "gradient":
        m = (yy if stripe_dir != 1 else xx) / (RES - 1)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}")
    return a[None, None] * (1 - m[..., None]) + b[None, None] * m[..., None]


def _object_layer(grey: np.ndarray, side: int, rgb: np.ndarray, obj: Obj) -> tuple[np.ndarray, np.ndarray]:
    """Colourize a 28x28 grey item at ``side`` px. Returns (rgb (s,s,3), alpha (s,s))."""
    g = np.asarray(Image.fromarray(grey).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    alpha = np.clip((g - 0.03) * 5.0, 0.0, 1.0)
    base = np.broadcast_to(rgb, (side, side, 3)).copy()
    if obj.print != "solid":
        prgb = np.asarray(obj.print_rgb if obj.print_rgb is not None else COLOURS[COLOUR_NAMES[(obj.colour + 5) % 10]],
                          dtype=np.float32) / 255.0
        yy, xx = np.mgrid[0:side, 0:side]
        k = obj.print_phase
        if obj.print == "twotone":  # lower third in the second colour
            m = yy >= (2 * side) // 3
        elif obj.print == "stripes":  # thin diagonal stripes, a quarter of the area
            m = ((xx + yy + k) % 6) < 2 if side > 24 else ((xx + yy + k) % 5) < 1
        elif obj.print == "dots":
            p = 6 if side > 24 else 4
            m = (((xx + k) % p) - p / 2 + 0.5) ** 2 + (((yy + k) % p) - p / 2 + 0.5) ** 2 <= (1.6 if side > 24 else 0.6)
        else:
            raise ValueError(f"unknown print {obj.print!r}")
        base[m] = prgb
    shade = 0.55 + 0.45 * g
    return np.clip(base * shade[..., None] + 0.12 * g[..., None] * (1 - base), 0, 1), alpha


def _centre(pos: str, side: int) -> tuple[float, float]:
    m = side / 2 + 2
    x = {"left": m, "right": RES - m}.get(pos.split()[-1], RES / 2)
    y = {"top": m, "bottom": RES - m}.get(pos.split()[0], RES / 2)
    return x, y


def object_boxes(n_objects: int, size: str = "small", position: str = "center") -> list[tuple[float, float, int]]:
    """(centre x, centre y, side) in pixels of each object of a scene, before its +-2 px jitter: where
    :func:`render` puts them (the attribute reader's class crops use the same geometry)."""
    if n_objects == 1:
        side = SIZE_PX[size]
        return [(*_centre(position, side), side)]
    side = SIZE_PX["small"] + 4
    return [(RES * 0.27, RES / 2, side), (RES * 0.73, RES / 2, side)]


def object_placements(scene: Scene) -> list[tuple[int, int, int]]:
    """(x0, y0, side) in pixels of each object of ``scene`` as :func:`render` draws it: its box, jittered, inside the image."""
    out = []
    for cx, cy, side in object_boxes(len(scene.objects), SIZES[scene.size], POSITIONS[scene.position]):
        x0 = int(round(cx - side / 2 + scene.jitter[0]))
        y0 = int(round(cy - side / 2 + scene.jitter[1]))
        out.append((min(max(x0, 0), RES - side), min(max(y0, 0), RES - side), side))
    return out


def render(scene: Scene, items: np.ndarray, return_mask: bool = False):
    """Render ``scene`` with grey items ``items`` (N, 28, 28) of its split. Returns uint8 (64, 64, 3)
    (and the float object mask (64, 64) if ``return_mask``)."""
    bg_rgb = np.asarray(scene.bg_rgb if scene.bg_rgb is not None else COLOURS[COLOUR_NAMES[scene.bg_colour]],
                        dtype=np.float32) / 255.0
    img = render_background(scene.bg_pattern, bg_rgb, scene.stripe_dir)
    mask = np.zeros((RES, RES), dtype=np.float32)
    for obj, (x0, y0, side) in zip(scene.objects, object_placements(scene)):
        rgb = np.asarray(obj.rgb if obj.rgb is not None else COLOURS[COLOUR_NAMES[obj.colour]], dtype=np.float32) / 255.0
        layer, alpha = _object_layer(items[obj.item], side, rgb, obj)
        sl = (slice(y0, y0 + side), slice(x0, x0 + side))
        img[sl] = img[sl] * (1 - alpha[..., None]) + layer * alpha[..., None]
        mask[sl] = np.maximum(mask[sl], alpha)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return (out, mask) if return_mask else out


def _jitter_rgb(rng: np.random.Generator, name: str, amount: int = 14) -> tuple[int, int, int]:
    c = np.asarray(COLOURS[name]) + rng.integers(-amount, amount + 1, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def sample_scene(rng: np.random.Generator, labels: np.ndarray, split: str = "train",
                 p_two: float = 0.15, p_print: float = 0.4) -> Scene:
    """Draw a random scene whose items come from ``labels`` (the class of each item of the split)."""
    def draw_obj(exclude: set[int]) -> Obj:
        cls = int(rng.integers(10))
        idx = np.flatnonzero(labels == cls)
        colour = int(rng.choice([c for c in range(10) if c not in exclude]))
        pr = str(rng.choice(PRINTS[1:])) if rng.random() < p_print else "solid"
        prgb = _jitter_rgb(rng, COLOUR_NAMES[int(rng.choice([c for c in range(10) if c != colour]))]) if pr != "solid" else None
        return Obj(cls=cls, item=int(rng.choice(idx)), colour=colour, rgb=_jitter_rgb(rng, COLOUR_NAMES[colour]),
                   print=pr, print_rgb=prgb, print_phase=int(rng.integers(6)))

    bg_colour = int(rng.integers(10))
    objs = [draw_obj({bg_colour})]
    if rng.random() < p_two:
        objs.append(draw_obj({bg_colour}))
    return Scene(objects=objs, size=int(rng.integers(2)), position=int(rng.integers(len(POSITIONS))),
                 bg_pattern=int(rng.integers(len(PATTERNS))), bg_colour=bg_colour,
                 bg_rgb=_jitter_rgb(rng, COLOUR_NAMES[bg_colour], 10),
                 jitter=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))),
                 stripe_dir=int(rng.integers(3)), split=split)


def render_batch(scenes: list[Scene], items: np.ndarray, return_mask: bool = False):
    outs = [render(s, items, return_mask=True) for s in scenes]
    imgs = np.stack([o[0] for o in outs])
    return (imgs, np.stack([o[1] for o in outs])) if return_mask else imgs
