import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def has_fmnist() -> bool:
    return os.path.isfile(FMNIST) or bool(os.environ.get("QUANTDREAM_FMNIST"))


needs_fmnist = pytest.mark.skipif(not has_fmnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is as fast, deterministic, and immune to oversubscription when the
    machine is shared (several threads on a busy core made some tests 200x slower)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
