"""A subject folder for `compare` and `batch`: its subject.json (the example subjects) or plain photos with a
class word, and the DreamBooth-style prompts a plain folder gets."""
from __future__ import annotations

from pathlib import Path


def default_prompts(class_word: str) -> list[dict]:
    """The world subjects' evaluation prompts (world/subjects.py), for a folder of plain photos."""
    from ..world.subjects import PROMPTS
    return [{"prompt": p, "expect": {"class": class_word, **e}, "kind": kind} for p, e, kind in PROMPTS]


def read_subject(folder: Path, init_word: str | None) -> tuple[dict, bool]:
    """(subject dict, True if it comes from plain photos and subject.json must be written)."""
    from .dataset import list_images
    from ..world.subjects import load_subject
    if not folder.exists():
        raise FileNotFoundError(f"--subject {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"--subject must be a folder of photos, but {str(folder)!r} is a file")
    photos = list_images(folder)      # refuses a folder with no images, naming what it holds
    if (folder / "subject.json").is_file():
        subject = load_subject(folder)
        if not subject.get("class_word"):
            raise ValueError(f"{folder / 'subject.json'} has no class_word")
        return subject, False
    if not init_word:
        raise ValueError(f"--subject {str(folder)!r} has no subject.json; give --init-word (the class word of the "
                         f"subject, e.g. bag) to compare on plain photos")
    return {"name": folder.resolve().name, "class_word": init_word, "dir": str(folder),
            "photos": [{"file": str(p.resolve())} for p in photos], "prompts": default_prompts(init_word)}, True
