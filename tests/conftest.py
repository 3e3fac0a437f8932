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


@pytest.fixture
def frozen_tiny():
    """Fresh components of the embedded model's architecture with random weights (seeded), frozen and in
    eval mode, in memory: tests may change them."""
    import torch

    from quantdream.models.embedded import build_components
    torch.manual_seed(0)
    c = build_components()
    for m in (c["text_encoder"], c["unet"], c["vae"]):
        m.requires_grad_(False).eval()
    return c


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A diffusers folder of the embedded model's architecture with random weights (seeded), built once per
    session; tests read it and never write into it."""
    import torch
    from diffusers import StableDiffusionPipeline

    from quantdream.models.embedded import build_components
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    StableDiffusionPipeline(**build_components(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def random_evaluator(tmp_path_factory):
    """World evaluator networks with random weights (plumbing tests do not depend on the trained ones)."""
    import torch

    from quantdream.eval.io import export_weights
    from quantdream.eval.reader import AttributeReader, ReaderConfig
    from quantdream.eval.worldclip import WorldClip, WorldClipConfig
    d = tmp_path_factory.mktemp("evaluator")
    torch.manual_seed(0)
    export_weights(AttributeReader(ReaderConfig()), ReaderConfig().to_dict(), d, "reader")
    export_weights(WorldClip(WorldClipConfig()), WorldClipConfig().to_dict(), d, "clip")
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three 48 px "photos" of a red square on plain backgrounds (seeded): enough for a run to train on."""
    import numpy as np
    from PIL import Image
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        a = np.full((48, 48, 3), rng.integers(0, 255, 3), np.uint8)
        a[12:36, 12:36] = (200, 30, 30)
        Image.fromarray(a).save(d / f"{i:02d}.png")
    return d
