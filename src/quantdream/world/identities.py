"""Captions with many identities: the embedded model v2's training text.

Real Stable Diffusion learned from captions that name countless specific things, so its
text-embedding space has room for one more (the token a personalization method learns). The v1
world only ever says "a red bag": a learned token has nowhere to go but a class-and-colour word.
v2's captions add two things:

- **named instances**: ``n`` made-up words, each bound to one training-split item with its own
  colouring, shade, print, print colour and print phase, used as "a friday bag" or "a friday"
  (DreamBooth's "a sks dog", with a rare word). Further instances are drawn but never named
  (``held_out``), so inverting them checks that a new token can reach a new identity;
- **compositional descriptions** of what v1 left unnamed: shades ("a light red bag", "a dark
  blue coat") and prints ("with orange dots", "with green stripes", "with a white bottom").

The made-up words are single tokens of the embedded tokenizer that no world caption, template or
prompt word uses, so each identity owns one embedding row, as a learned token does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .captions import PREFIXES, background_phrase, noun_phrase
from .render import COLOUR_NAMES, COLOURS, POSITION_PHRASE, PRINTS, Obj, Scene, _jitter_rgb

SHADES = {"light": (1.0, 0.38), "dark": (0.0, 0.42)}  # blend target (white / black) and amount
PRINT_PHRASE = {"dots": "with {} dots", "stripes": "with {} stripes", "twotone": "with a {} bottom"}
STOP_WORDS = {"see", "they", "you", "not", "will", "have", "there", "where", "like", "look", "looking", "find",
              "get", "take", "come", "coming", "into", "than", "about", "again", "out", "down", "very", "please"}


def shade_rgb(rgb: tuple[int, int, int], shade: str | None) -> tuple[int, int, int]:
    if not shade:
        return rgb
    target, amount = SHADES[shade]
    c = np.asarray(rgb, dtype=np.float32) * (1 - amount) + 255.0 * target * amount
    return tuple(int(round(v)) for v in c)


def nearest_colour(rgb: tuple[int, int, int]) -> str:
    pal = np.asarray([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)
    return COLOUR_NAMES[int(np.argmin(((pal - np.asarray(rgb, dtype=np.float32)) ** 2).sum(1)))]


@dataclass
class Instance:
    """One identity: a word bound to one item with its colouring and print (a personal subject)."""
    word: str
    obj: Obj
    shade: str | None = None

    def to_dict(self) -> dict:
        return {"word": self.word, "shade": self.shade, **asdict(self.obj)}


def instance_words(tokenizer, exclude: set[str], n: int) -> list[str]:
    """``n`` single-token whole words of ``tokenizer`` that are not in ``exclude`` (vocabulary order)."""
    out = []
    for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        w = tok[:-4] if tok.endswith("</w>") else ""
        if len(w) >= 4 and w.isalpha() and w.islower() and w not in exclude and w not in STOP_WORDS \
                and len(tokenizer.tokenize(w)) == 1:
            out.append(w)
        if len(out) == n:
            return out
    raise ValueError(f"the tokenizer has only {len(out)} free single-token words, {n} asked")


def make_instances(rng: np.random.Generator, labels: np.ndarray, words: list[str]) -> list[Instance]:
    """One instance per word: a random item of the split, a jittered palette colour, often a shade
    and a print (prints are what a personal subject has: 70% carry one)."""
    out = []
    for w in words:
        cls = int(rng.integers(10))
        colour = int(rng.integers(10))
        shade = str(rng.choice(["light", "dark"])) if rng.random() < 0.3 and COLOUR_NAMES[colour] not in (
            "white", "black") else None
        pr = str(rng.choice(PRINTS[1:])) if rng.random() < 0.7 else "solid"
        pc = int(rng.choice([c for c in range(10) if c != colour]))
        obj = Obj(cls=cls, item=int(rng.choice(np.flatnonzero(labels == cls))), colour=colour,
                  rgb=shade_rgb(_jitter_rgb(rng, COLOUR_NAMES[colour]), shade), print=pr,
                  print_rgb=_jitter_rgb(rng, COLOUR_NAMES[pc]) if pr != "solid" else None,
                  print_phase=int(rng.integers(6)))
        out.append(Instance(w, obj, shade))
    return out


def sample_scene_v2(rng: np.random.Generator, by_class: list[np.ndarray], instances: list[Instance],
                    p_named: float = 0.25, p_shade: float = 0.3, p_two: float = 0.12,
                    p_print: float = 0.45) -> tuple[Scene, dict]:
    """A v1-like scene (``by_class[c]``: the item indices of class c) plus what v2 captions can name:
    returns (scene, extra) with extra = {"instance": word or None, "shade": ..., "print_colour": ...}."""
    bg_colour = int(rng.integers(10))
    extra = {"instance": None, "shade": None, "print_colour": None}
    if instances and rng.random() < p_named:
        inst = instances[int(rng.integers(len(instances)))]
        o = inst.obj
        if o.colour == bg_colour:  # keep the object visible
            bg_colour = (bg_colour + 1 + int(rng.integers(9))) % 10
        objs = [Obj(**asdict(o))]
        extra.update(instance=inst.word, shade=inst.shade)
    else:
        cls = int(rng.integers(10))
        colour = int(rng.choice([c for c in range(10) if c != bg_colour]))
        shade = (str(rng.choice(["light", "dark"])) if rng.random() < p_shade
                 and COLOUR_NAMES[colour] not in ("white", "black") else None)
        pr = str(rng.choice(PRINTS[1:])) if rng.random() < p_print else "solid"
        pc = int(rng.choice([c for c in range(10) if c != colour]))
        objs = [Obj(cls=cls, item=int(rng.choice(by_class[cls])), colour=colour,
                    rgb=shade_rgb(_jitter_rgb(rng, COLOUR_NAMES[colour]), shade), print=pr,
                    print_rgb=_jitter_rgb(rng, COLOUR_NAMES[pc]) if pr != "solid" else None,
                    print_phase=int(rng.integers(6)))]
        extra.update(shade=shade)
        if rng.random() < p_two:
            cls2 = int(rng.integers(10))
            c2 = int(rng.choice([c for c in range(10) if c != bg_colour]))
            objs.append(Obj(cls=cls2, item=int(rng.choice(by_class[cls2])), colour=c2,
                            rgb=_jitter_rgb(rng, COLOUR_NAMES[c2])))
    if objs[0].print != "solid":
        extra["print_colour"] = nearest_colour(objs[0].print_rgb)
    scene = Scene(objects=objs, size=int(rng.integers(2)), position=int(rng.integers(9)),
                  bg_pattern=int(rng.integers(5)), bg_colour=bg_colour,
                  bg_rgb=_jitter_rgb(rng, COLOUR_NAMES[bg_colour], 10),
                  jitter=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), stripe_dir=int(rng.integers(3)))
    return scene, extra


def caption_v2(scene: Scene, extra: dict, rng: np.random.Generator, p_drop: float = 0.25,
               p_prefix: float = 0.3, p_print: float = 0.6) -> str:
    """v1's grammar with v2's object phrase:
    ``[size] ([shade] [colour] CLASS [with PRINT] | WORD [CLASS])``."""
    attrs = scene.attributes()
    keep = lambda: rng.random() >= p_drop
    o = scene.objects[0]
    size = attrs.get("size") if attrs["n_objects"] == 1 and keep() else ""
    if extra.get("instance"):
        words = [size, extra["instance"], attrs["class"] if rng.random() < 0.5 else ""]
    else:
        colour = attrs["colour"] if keep() else ""
        shade = extra.get("shade") if colour and extra.get("shade") and rng.random() >= p_drop else ""
        words = [size, shade, colour, attrs["class"]]
        if o.print != "solid" and rng.random() < p_print:
            words.append(PRINT_PHRASE[o.print].format(extra["print_colour"]))
    parts = [noun_phrase(words)]
    if attrs["n_objects"] == 2:
        parts.append("next to " + noun_phrase([attrs["colour2"] if keep() else "", attrs["class2"]]))
    if keep():
        parts.append(background_phrase(attrs["bg_pattern"] if keep() else None, attrs["bg_colour"]))
    if attrs["n_objects"] == 1 and keep():
        parts.append(POSITION_PHRASE[attrs["position"]])
    text = " ".join(parts)
    if rng.random() < p_prefix:
        text = str(rng.choice(PREFIXES[1:])) + text
    return text



def write_instance_subjects(instances_json: str | Path, out: str | Path, which: str = "held_out",
                            fmnist: str | None = None, n_photos: int = 5, seed: int = 2024) -> list[Path]:
    """Subject folders (the layout of ``world/subjects.py``) of the identities in a v2 model's
    ``instances.json``: inverting the ``held_out`` ones checks that a new token can reach an identity
    the model has drawn but never heard named; the ``named`` ones can also be prompted by their own word."""
    import json

    from PIL import Image

    from .captions import scene_context
    from .fmnist import load_fmnist
    from .render import CLASSES, render
    from .subjects import PROMPTS, photo_scenes
    rec = json.loads(Path(instances_json).read_text())
    if which not in ("held_out", "named"):
        raise ValueError(f"which must be 'held_out' or 'named', got {which!r}")
    if not 1 <= n_photos <= 9:
        raise ValueError(f"n_photos must be 1..9 (one position each), got {n_photos}")
    items, _ = load_fmnist("train", fmnist)
    keys = {f.name for f in fields(Obj)}
    written = []
    for k, d in enumerate(rec[which]):
        obj = Obj(**{key: tuple(v) if isinstance(v, list) else v for key, v in d.items() if key in keys})
        obj.item = int(d["train_index"]) if len(items) == 60_000 else int(d["item"])  # full split or the subset
        name = f"{which}_{d['word']}"
        sub = Path(out) / name
        sub.mkdir(parents=True, exist_ok=True)
        caps, photos = {}, []
        for i, sc in enumerate(photo_scenes(name, obj, np.random.default_rng([seed, k]), n_photos)):
            sc.split = "train"
            fn = f"{i:02d}.png"
            Image.fromarray(render(sc, items)).save(sub / fn)
            caps[fn] = "a photo of a {} " + scene_context(sc)
            photos.append({"file": fn, "scene": sc.to_dict()})
        (sub / "captions.json").write_text(json.dumps(caps, indent=2) + "\n")
        cls = CLASSES[obj.cls]
        meta = {"name": name, "class_word": cls, "fmnist_split": "train", "fmnist_index": int(d["train_index"]),
                "instance_word": d["word"], "object": asdict(obj), "photos": photos,
                "prompts": [{"prompt": p, "expect": {"class": cls, **e}, "kind": kind} for p, e, kind in PROMPTS]}
        (sub / "subject.json").write_text(json.dumps(meta, indent=1) + "\n")
        written.append(sub)
    return written


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Write subject folders of a v2 model's identities (instances.json)")
    ap.add_argument("instances", help="instances.json of an embedded model v2 folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--which", choices=["held_out", "named"], default="held_out")
    ap.add_argument("--fmnist", default=None, help="folder with the Fashion-MNIST *.gz files (full or subset)")
    ap.add_argument("--photos", type=int, default=5)
    a = ap.parse_args(argv)
    if not Path(a.instances).is_file():
        ap.error(f"{a.instances} not found")
    for d in write_instance_subjects(a.instances, a.out, a.which, a.fmnist, a.photos):
        print(d)


if __name__ == "__main__":
    main()
