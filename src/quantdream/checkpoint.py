"""Atomic writes, resumable checkpoints and clean Ctrl-C handling, shared by every training loop."""
from __future__ import annotations

import json
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file.
    The file gets the permissions a plain ``open(path, "w")`` would (0666 less the umask), not
    mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be created or written: its nearest existing
    parent is probed with a temporary file (removed at once), which also catches read-only file systems
    and holds for root, where permission bits say nothing."""
    folder = Path(folder).absolute()
    base = folder
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise NotADirectoryError(f"{flag} {str(folder)!r}: {str(base)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantdream-probe.", dir=base)
    except OSError as e:
        what = "write into" if base == folder else f"create {folder.name!r} in"
        raise ValueError(f"{flag} {str(folder)!r}: cannot {what} {str(base)!r} ({e.strerror}); choose a folder "
                         f"you can write") from None
    os.close(fd)
    os.unlink(probe)


def atomic_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    atomic_write(path, lambda t: torch.save(state, t))


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it, saves a checkpoint and exits cleanly.
    A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.stop = False

    def __bool__(self) -> bool:
        return self.stop


@contextmanager
def graceful_interrupt():
    flag = StopFlag()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag.stop:
            raise KeyboardInterrupt
        flag.stop = True

    for s in old:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
