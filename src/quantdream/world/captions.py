"""Caption grammar of the embedded world.

    [prefix] a [size] [colour] CLASS [next to a [colour] CLASS] [on a [pattern] COLOUR background] [position]

e.g. "a large red bag on a striped blue background at the top left". Each optional part can be
dropped; ``caption`` returns the text and the attributes it names (what a prompt-accuracy
check compares against the attribute reader).
"""
from __future__ import annotations

import numpy as np

from .render import CLASSES, COLOUR_NAMES, PATTERNS, POSITION_PHRASE, POSITIONS, SIZES, Scene

PREFIXES = ["", "a photo of ", "a picture of ", "an image of ", "a rendering of "]


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def noun_phrase(words: list[str]) -> str:
    words = [w for w in words if w]
    return f"{article(words[0])} {' '.join(words)}"


def background_phrase(pattern: str | None, colour: str | None) -> str:
    return "on " + noun_phrase([pattern or "", colour or "", "background"])


def caption(scene: Scene, rng: np.random.Generator | None = None, p_drop: float = 0.25,
            p_prefix: float = 0.3) -> tuple[str, dict]:
    """Caption a scene. With ``rng``, each optional part is dropped with probability ``p_drop``.

    Returns (text, named) where ``named`` maps each named attribute to its value, with keys from
    class, colour, size, position, bg_pattern, bg_colour, class2, colour2.
    """
    attrs = scene.attributes()
    keep = (lambda: rng.random() >= p_drop) if rng is not None else (lambda: True)
    named = {"class": attrs["class"]}
    size = attrs.get("size") if attrs["n_objects"] == 1 and keep() else None
    colour = attrs["colour"] if keep() else None
    parts = [noun_phrase([size or "", colour or "", attrs["class"]])]
    if size:
        named["size"] = size
    if colour:
        named["colour"] = colour
    if attrs["n_objects"] == 2:
        colour2 = attrs["colour2"] if keep() else None
        parts.append("next to " + noun_phrase([colour2 or "", attrs["class2"]]))
        named["class2"] = attrs["class2"]
        if colour2:
            named["colour2"] = colour2
    if keep():
        pattern = attrs["bg_pattern"] if keep() else None
        parts.append(background_phrase(pattern, attrs["bg_colour"]))
        named["bg_colour"] = attrs["bg_colour"]
        if pattern:
            named["bg_pattern"] = pattern
    if attrs["n_objects"] == 1 and keep():
        parts.append(POSITION_PHRASE[attrs["position"]])
        named["position"] = attrs["position"]
    text = " ".join(parts)
    if rng is not None and rng.random() < p_prefix:
        text = str(rng.choice(PREFIXES[1:])) + text
    return text, named


def scene_context(scene: Scene) -> str:
    """The part of a caption that is not the subject: background and position ("comprehensive
    captioning" of a subject photo, with the subject itself replaced by the token)."""
    attrs = scene.attributes()
    text = background_phrase(attrs["bg_pattern"], attrs["bg_colour"])
    if attrs["n_objects"] == 1:
        text += " " + POSITION_PHRASE[attrs["position"]]
    return text


# every word the grammar can produce, for the tokenizer
def vocabulary_words() -> list[str]:
    words = set(CLASSES) | set(COLOUR_NAMES) | set(PATTERNS) | set(SIZES)
    for p in list(POSITION_PHRASE.values()) + PREFIXES:
        words |= set(p.split())
    words |= {"a", "an", "on", "next", "to", "background"} | set(" ".join(POSITIONS).split())
    return sorted(words)
