import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def has_fmnist() -> bool:
    return os.path.isfile(FMNIST) or bool(os.environ.get("QUANTDREAM_FMNIST"))


needs_fmnist = pytest.mark.skipif(not has_fmnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
