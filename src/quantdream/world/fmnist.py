"""Fashion-MNIST reader: the objects of the embedded world.

The 70k 28x28 grey items come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or from a folder holding the four standard
``*-ubyte.gz`` files (``--fmnist DIR`` or ``QUANTDREAM_FMNIST``). Only training the
embedded model and its evaluator needs them; the subjects committed under
``examples/subjects`` are PNGs.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def find_fmnist_dir(path: str | os.PathLike | None = None) -> Path:
    candidates = [path] if path else [os.environ.get("QUANTDREAM_FMNIST"), *DEFAULT_DIRS]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for pair in FILES.values() for f in pair):
            return Path(c)
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in {[str(c) for c in candidates if c]}). "
        "Install it with `apt-get install dataset-fashion-mnist`, or pass a folder holding "
        "train/t10k-{images-idx3,labels-idx1}-ubyte.gz with --fmnist or QUANTDREAM_FMNIST."
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated or corrupt: expected {dims}, got {arr.size} bytes")
    return arr.reshape(dims)


def load_fmnist(split: str, path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images (N, 28, 28) uint8, labels (N,) int64) of ``split`` in {"train", "test"}."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = find_fmnist_dir(path)
    img_f, lab_f = FILES[split]
    return _read_idx(root / img_f), _read_idx(root / lab_f).astype(np.int64)
