"""Personal subjects of the embedded world: one specific Fashion-MNIST *test* item each, with its own
off-palette colouring and print that no caption word pins down, photographed in 5 scenes.

    python -m quantdream.world.subjects --out examples/subjects

writes ``<out>/<name>/{00..04}.png``, ``captions.json`` (a per-image caption with ``{}`` for the
subject, the paper's comprehensive-captioning setting) and ``subject.json`` (class word, the
record that renders the subject, and the evaluation prompts with the attributes each names,
mirroring the DreamBooth protocol: new context, property change, composition).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import scene_context
from .render import CLASSES, COLOURS, COLOUR_NAMES, PATTERNS, POSITIONS, Obj, Scene, render

# name: (class, rgb, print, print rgb) -- shades between the palette's named colours
SUBJECTS = {
    "teal_bag": ("bag", (0, 140, 140), "dots", (250, 165, 60)),
    "salmon_sneaker": ("sneaker", (250, 128, 114), "stripes", (30, 30, 110)),
    "olive_coat": ("coat", (128, 128, 0), "twotone", (120, 20, 40)),
    "lavender_dress": ("dress", (190, 160, 230), "solid", None),
    "mustard_boot": ("boot", (205, 165, 40), "twotone", (70, 40, 20)),
    "navy_pullover": ("pullover", (30, 40, 110), "dots", (235, 235, 235)),
    "coral_top": ("top", (255, 110, 80), "stripes", (245, 245, 245)),
    "mint_trousers": ("trousers", (150, 230, 180), "solid", None),
    "plum_sandal": ("sandal", (120, 40, 90), "solid", None),
    "rust_shirt": ("shirt", (180, 80, 30), "dots", (240, 215, 35)),
}

# (prompt with {} for the subject, attributes it names besides the subject's class, kind)
PROMPTS = [
    ("a {} on a green background", {"bg_colour": "green"}, "context"),
    ("a {} on a striped yellow background", {"bg_pattern": "striped", "bg_colour": "yellow"}, "context"),
    ("a {} on a checkered white background", {"bg_pattern": "checkered", "bg_colour": "white"}, "context"),
    ("a {} on a dotted pink background", {"bg_pattern": "dotted", "bg_colour": "pink"}, "context"),
    ("a {} on a gradient blue background", {"bg_pattern": "gradient", "bg_colour": "blue"}, "context"),
    ("a {} at the top left", {"position": "top left"}, "context"),
    ("a {} at the bottom right", {"position": "bottom right"}, "context"),
    ("a {} on the left", {"position": "left"}, "context"),
    ("a red {}", {"colour": "red"}, "property"),
    ("a purple {}", {"colour": "purple"}, "property"),
    ("a small {}", {"size": "small"}, "property"),
    ("a large {}", {"size": "large"}, "property"),
    ("a {} next to a sneaker", {"class2": "sneaker"}, "composition"),
    ("a {} next to a black bag", {"class2": "bag", "colour2": "black"}, "composition"),
]


def nearest_colour(rgb) -> int:
    d = [sum((a - b) ** 2 for a, b in zip(rgb, COLOURS[n])) for n in COLOUR_NAMES]
    return int(np.argmin(d))


def subject_obj(name: str, item: int) -> Obj:
    cls, rgb, pr, prgb = SUBJECTS[name]
    return Obj(cls=CLASSES.index(cls), item=item, colour=nearest_colour(rgb), rgb=rgb, print=pr, print_rgb=prgb,
               print_phase=1)


def photo_scenes(name: str, obj: Obj, rng: np.random.Generator, n: int = 5) -> list[Scene]:
    """Varied scenes, like DreamBooth photos: different backgrounds and places, mostly close up."""
    far = [c for c in range(10) if sum((a - b) ** 2 for a, b in zip(obj.rgb, COLOURS[COLOUR_NAMES[c]])) > 90 ** 2]
    bgs = rng.choice(far, size=n, replace=len(far) < n)
    pats = rng.permutation(len(PATTERNS))
    pos = rng.choice(len(POSITIONS), size=n, replace=False)
    return [Scene(objects=[obj], size=0 if i == n - 1 else 1, position=int(pos[i]), bg_pattern=int(pats[i % 5]),
                  bg_colour=int(bgs[i]), jitter=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))),
                  stripe_dir=int(rng.integers(3)), split="test") for i in range(n)]


def write_subjects(out: str | Path, fmnist: str | None = None, seed: int = 2024) -> list[Path]:
    from .fmnist import load_fmnist
    items, labels = load_fmnist("test", fmnist)
    written = []
    for k, name in enumerate(SUBJECTS):
        rng = np.random.default_rng([seed, k])
        cls = CLASSES.index(SUBJECTS[name][0])
        item = int(rng.choice(np.flatnonzero(labels == cls)))
        obj = subject_obj(name, item)
        d = Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        caps, photos = {}, []
        for i, sc in enumerate(photo_scenes(name, obj, rng)):
            fn = f"{i:02d}.png"
            Image.fromarray(render(sc, items)).save(d / fn)
            caps[fn] = "a photo of a {} " + scene_context(sc)
            photos.append({"file": fn, "scene": sc.to_dict()})
        (d / "captions.json").write_text(json.dumps(caps, indent=2) + "\n")
        meta = {
            "name": name, "class_word": SUBJECTS[name][0], "fmnist_split": "test", "fmnist_index": item,
            "object": {k2: v for k2, v in obj.__dict__.items()},
            "photos": photos,
            "prompts": [{"prompt": p, "expect": {"class": SUBJECTS[name][0], **e}, "kind": kind} for p, e, kind in PROMPTS],
        }
        (d / "subject.json").write_text(json.dumps(meta, indent=1) + "\n")
        written.append(d)
    return written


def load_folder_meta(path: str | Path, kind: str) -> dict:
    """Read ``<kind>.json`` of an example folder (a subject, a style) plus its ``dir``, with a clear error when
    the folder has none."""
    p = Path(path) / f"{kind}.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a {kind} folder: it has no {kind}.json")
    meta = json.loads(p.read_text())
    meta["dir"] = str(Path(path))
    return meta


def load_subject(path: str | Path) -> dict:
    """Read ``subject.json`` of a subject folder, with a clear error when it is not one."""
    return load_folder_meta(path, "subject")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="examples/subjects")
    ap.add_argument("--fmnist", default=None, help="folder with the Fashion-MNIST *.gz files")
    a = ap.parse_args()
    for d in write_subjects(a.out, a.fmnist):
        print(d)


if __name__ == "__main__":
    main()
