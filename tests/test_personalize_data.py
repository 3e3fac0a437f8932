"""Reference photos (loading, errors, flips, latent cache, captions) and embedding files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from quantdream.data.dataset import SubjectImages, list_images, load_caption_file
from quantdream.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from quantdream.export import load_embedding, save_a1111, save_diffusers


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def folder(tmp_path):
    for i, size in enumerate([(40, 30), (64, 64), (100, 80)]):
        a = np.zeros((size[1], size[0], 3), np.uint8)
        a[:, : size[0] // 2] = (255, 0, 0)                          # left half red: flips are visible
        Image.fromarray(a).save(tmp_path / f"{i:02d}.{['png', 'jpg', 'webp'][i]}")
    (tmp_path / "subject.json").write_text("{}")
    return tmp_path


class MeanVAE:
    """A stand-in autoencoder: the latent is the 8x8-pooled image, std 0.1 everywhere."""

    class Dist:
        def __init__(self, x):
            self.mean = torch.nn.functional.avg_pool2d(x, 8)
            self.std = torch.full_like(self.mean, 0.1)

    class Out:
        def __init__(self, d):
            self.latent_dist = d

    def encode(self, x):
        return self.Out(self.Dist(x))


def test_load_resizes_every_format(folder):
    data = SubjectImages(folder, resolution=32)
    assert data.names == ["00.png", "01.jpg", "02.webp"]
    assert data.pixels.shape == (3, 3, 32, 32)
    assert data.pixels.min() >= -1 and data.pixels.max() <= 1
    assert data.pixels[0, 0, :, 0].mean() > 0.9 and data.pixels[0, 0, :, -1].mean() < -0.9   # red left


def test_latents_cached_with_and_without_flip_and_sampled_reproducibly(folder):
    data = SubjectImages(folder, resolution=32, flip_p=0.5)
    data.encode(MeanVAE(), scaling_factor=2.0)
    assert data.mean.shape == (3, 2, 3, 4, 4)
    torch.testing.assert_close(data.mean[:, 1], data.mean[:, 0].flip(-1))
    torch.testing.assert_close(data.std, torch.full_like(data.std, 0.2))
    a = data.sample(64, torch.Generator().manual_seed(0), "<tok>")
    b = data.sample(64, torch.Generator().manual_seed(0), "<tok>")
    assert torch.equal(a.latents, b.latents) and a.captions == b.captions
    assert 10 < sum(a.flipped) < 54 and set(a.index) == {0, 1, 2}
    assert all("<tok>" in c for c in a.captions)
    assert {c.replace("<tok>", "{}") for c in a.captions} <= set(OBJECT_TEMPLATES)
    for i, f, z in zip(a.index, a.flipped, a.latents):
        assert (z - data.mean[i, int(f)]).abs().max() < 1.0      # drawn around the right cached mean


def test_style_templates(folder):
    data = SubjectImages(folder, 32, learnable_property="style")
    assert data.templates == STYLE_TEMPLATES
    with pytest.raises(ValueError, match="learnable property must be 'object' or 'style', got 'thing'"):
        SubjectImages(folder, 32, learnable_property="thing")


def test_per_image_captions(folder):
    caps = {"00.png": "a photo of a {} on a green background", "01.jpg": ["a {} at the top", "a {} on the left"],
            "02.webp": "a {}"}
    f = folder / "captions.json"
    f.write_text(json.dumps(caps))
    data = SubjectImages(folder, 32, captions=f)
    data.encode(MeanVAE(), 1.0)
    b = data.sample(50, torch.Generator().manual_seed(1), "<t>")
    for i, c in zip(b.index, b.captions):
        want = caps[data.names[i]]
        assert c in ([w.format("<t>") for w in want] if isinstance(want, list) else [want.format("<t>")])


@pytest.mark.parametrize("content,match", [
    ("not json", "is not valid JSON"),
    ('["a {}"]', "must map image file names to captions"),
    ('{"00.png": "a photo", "01.jpg": "a {}", "02.webp": "a {}"}', r"must contain '\{\}' exactly once"),
    ('{"00.png": 3, "01.jpg": "a {}", "02.webp": "a {}"}', "must be a string or a list of strings"),
    ('{"00.png": "a {}"}', "has no caption for image '01.jpg'"),
])
def test_caption_file_errors(folder, content, match):
    f = folder / "caps.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_caption_file(f, [p.name for p in list_images(folder)])


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="must be a folder of photos"):
        list_images(tmp_path / "file.png")
    with pytest.raises(ValueError, match=r"cannot read image 'file.png'"):
        SubjectImages(tmp_path, 32)


def test_diffusers_and_a1111_round_trip(tmp_path):
    theta = torch.randn(3, 768)
    p = save_diffusers(tmp_path, "<tok>", theta)
    assert p.name == "learned_embeds.safetensors"
    tok, rows = load_embedding(tmp_path)
    assert tok == "<tok>" and torch.equal(rows, theta)
    q = save_a1111(tmp_path / "tok.pt", "<tok>", theta, step=7)
    tok, rows = load_embedding(q)
    assert tok == "<tok>" and torch.equal(rows, theta)
    assert torch.load(q, weights_only=True)["step"] == 7
    torch.save({"emb_params": theta}, tmp_path / "kohya.pt")
    assert torch.equal(load_embedding(tmp_path / "kohya.pt")[1], theta)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must be \[num_vectors, dim\]"):
        save_diffusers(tmp_path, "<t>", torch.zeros(1, 2, 3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embedding(tmp_path / "none.safetensors")
    from safetensors.torch import save_file
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.ones(1, 1280)}, str(tmp_path / "xl.safetensors"))
    tok, rows = load_embedding(tmp_path / "xl.safetensors")        # SDXL: [clip_l | clip_g]
    assert tok is None and rows.shape == (1, 2048) and rows[0, 767] == 0 and rows[0, 768] == 1
