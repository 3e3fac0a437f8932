"""Fashion-MNIST reader: the objects of the embedded world.

The 70k 28x28 grey items come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or from a folder holding the four standard
``*-ubyte.gz`` files (``--fmnist DIR`` or ``QUANTDREAM_FMNIST``). Only training the
embedded model and its evaluator needs them; the subjects committed under
``examples/subjects`` are PNGs.
"""
from __future__ import annotations

import gzip
import json
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


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """Write uint8 ``arr`` in the idx format (gzip), as the standard files are."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def write_subset(out: str | os.PathLike, per_class: int, test_per_class: int = 100,
                 path: str | os.PathLike | None = None) -> dict:
    """A class-balanced subset in the standard four-file layout (the first ``per_class`` items of each
    class of the train split, ``test_per_class`` of the test split, in their original order), plus
    ``subset.json`` mapping each kept item to its index in the full split. Returns that mapping."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        images, labels = load_fmnist(split, path)
        idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)]))
        img_f, lab_f = FILES[split]
        _write_idx(out / img_f, images[idx])
        _write_idx(out / lab_f, labels[idx].astype(np.uint8))
        kept[f"{split}_indices"] = idx.tolist()
    (out / "subset.json").write_text(json.dumps(kept) + "\n")
    return kept


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Write a class-balanced Fashion-MNIST subset (idx .gz files), e.g. "
                                             "for a machine without the dataset: QUANTDREAM_FMNIST=DIR")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset")
    s.add_argument("--per-class", type=int, default=1700, help="train items per class (1700: ~7.6 MiB in all)")
    s.add_argument("--test-per-class", type=int, default=100)
    s.add_argument("--out", required=True)
    s.add_argument("--fmnist", default=None, help="folder of the full set (default: the usual places)")
    a = ap.parse_args(argv)
    if a.per_class < 1 or a.test_per_class < 1:
        ap.error("--per-class and --test-per-class must be >= 1")
    kept = write_subset(a.out, a.per_class, a.test_per_class, a.fmnist)
    size = sum(f.stat().st_size for f in Path(a.out).iterdir())
    print(f"wrote {len(kept['train_indices'])} train + {len(kept['test_indices'])} test items to {a.out} "
          f"({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
