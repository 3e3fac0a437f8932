"""What a new user brings: photos in every format a phone or an editor writes, wrong flags, files for
another model. Each case: the documented exit status (2 for an error, 0 with a warning), a one-line
message in the user's words, and nothing written on an error."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from quantdream.checkpoint import atomic_write
from quantdream.cli.main import main
from quantdream.data.dataset import SubjectImages, load_images

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "subjects" / "teal_bag"


def one_line_error(capsys, command: str, pattern: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and re.search(pattern, err[-1]), err
    assert err[-1].startswith(f"quantdream {command}: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def real_photos(tmp_path_factory):
    """Two real photographs that ship with scikit-learn (a dependency): not the embedded model's world."""
    from sklearn.datasets import load_sample_images
    d = tmp_path_factory.mktemp("real")
    for i, im in enumerate(load_sample_images().images):
        Image.fromarray(im).save(d / f"{i:02d}.jpg")
    return d


def personalize_args(model, images, out, *extra):
    return ["personalize", "--images", str(images), "--token", "<my-bag>", "--init-word", "bag",
            "--model", str(model), "--weights", "none", "--method", "ti", "--out", str(out), "--threads", "1",
            "--set", "sample_images=0", *extra]


# ----------------------------------------------------------------------------- reading photos
def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    a = np.full((16, 16), 16384, np.uint16)                    # a quarter of the 16-bit range: dark grey
    a[:, 8:] = 49152                                            # three quarters: light grey
    Image.fromarray(a).save(tmp_path / "deep.png")
    im = Image.open(tmp_path / "deep.png")
    assert im.mode.startswith("I"), im.mode                     # what PIL makes of it (convert("RGB") -> 255)
    x = load_images([tmp_path / "deep.png"], 16)
    left, right = x[:, :, :, :4].mean().item(), x[:, :, :, -4:].mean().item()
    assert left == pytest.approx(64 / 127.5 - 1, abs=0.02) and right == pytest.approx(191 / 127.5 - 1, abs=0.02)


def test_exif_orientation_is_applied(tmp_path):
    """A phone portrait is stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to show)."""
    upright = np.zeros((32, 32, 3), np.uint8)
    upright[:16] = (255, 0, 0)                                  # red on top
    upright[16:] = (0, 0, 255)                                  # blue below
    stored = Image.fromarray(upright).rotate(90)                # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    x = load_images([tmp_path / "portrait.jpg"], 32)[0]          # (3, 32, 32)
    top, bottom = x[:, :12].mean((1, 2)), x[:, -12:].mean((1, 2))
    assert top[0] > 0.8 and top[2] < -0.8, top                  # red
    assert bottom[2] > 0.8 and bottom[0] < -0.8, bottom         # blue


def test_a_wide_photo_is_center_cropped_not_squashed(tmp_path):
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20], a[:, 20:40], a[:, 40:] = (0, 255, 0), (255, 0, 0), (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = load_images([tmp_path / "wide.png"], 8)[0]
    torch.testing.assert_close(x[:, 1:-1, 1:-1].mean((1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.02, rtol=0)


def test_encoding_shows_progress(photos, capsys):
    class FakeVAE:
        def encode(self, x):
            m = torch.zeros(1, 4, 2, 2)
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=m, std=m + 1))
    data = SubjectImages(photos, 16)
    data.encode(FakeVAE(), 1.0, progress=True)
    assert "encoding photos" in capsys.readouterr().err and data.mean.shape == (3, 2, 4, 2, 2)
    data.encode(FakeVAE(), 1.0)
    assert "encoding photos" not in capsys.readouterr().err


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.json", lambda t: Path(t).write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == mode


# ----------------------------------------------------------------------------- the embedded model's world
def test_world_check_passes_the_example_subjects_and_flags_real_photos(real_photos, caplog):
    from quantdream.data.dataset import list_images
    from quantdream.data.world_check import THRESHOLD, warn_if_not_world, world_score
    world = world_score(list_images(EXAMPLE))
    real = world_score(list_images(real_photos))
    assert world > THRESHOLD > real, (world, real)
    assert not warn_if_not_world(list_images(EXAMPLE), str(EXAMPLE)) and not caplog.records
    assert warn_if_not_world(list_images(real_photos), str(real_photos))
    assert "only draws its Fashion-MNIST world" in caplog.text and "--model PATH" in caplog.text


def test_real_photos_on_the_embedded_model_are_flagged_before_loading_it(real_photos, tmp_path, caplog, capsys):
    """The warning comes first, before any other check: here the run then stops at a taken --out."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(personalize_args("tiny", real_photos, out, "--steps", "1")) == 2
    assert "do not look like the embedded model's world" in caplog.text
    one_line_error(capsys, "personalize", "already exists and is not empty")


# ----------------------------------------------------------------------------- personalize
def test_steps_zero_is_refused(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(personalize_args(tiny_model, photos, out, "--steps", "0")) == 2
    one_line_error(capsys, "personalize", r"--steps 0: give the number of training steps \(>= 1\)")
    assert not out.exists()


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only system folder")
def test_an_output_folder_that_cannot_be_written_is_refused_first(tiny_model, photos, tmp_path, capsys):
    assert main(personalize_args(tiny_model, photos, "/sys/quantdream-run", "--steps", "1")) == 2
    one_line_error(capsys, "personalize", r"--out '/sys/quantdream-run': cannot create 'quantdream-run' in '/sys'")
    (tmp_path / "file").write_text("x")
    assert main(personalize_args(tiny_model, photos, tmp_path / "file" / "run", "--steps", "1")) == 2
    one_line_error(capsys, "personalize", r"is a file, not a folder")


@pytest.mark.slow
def test_one_photo_trains_with_a_warning(tiny_model, photos, tmp_path, caplog):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(photos / "00.png", one / "00.png")
    assert main(personalize_args(tiny_model, one, tmp_path / "run", "--steps", "1")) == 0
    assert "only one photo" in caplog.text and "3-6 photos" in caplog.text


def test_help_states_the_defaults(capsys):
    from quantdream.cli.personalize import CHECKPOINT_EVERY, SAMPLE_EVERY, STEP_DEFAULTS
    from quantdream.train import EMBEDDED_DEFAULTS, SD_DEFAULTS, RunConfig
    with pytest.raises(SystemExit):
        main(["personalize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "zoodip 1500/30000" in text and "ti 400/5000" in text
    assert "every N steps (default 500; 0: final grid only)" in text
    assert "every N steps (default 500; 0: only at the end)" in text
    assert (SAMPLE_EVERY, CHECKPOINT_EVERY) == (RunConfig().sample_every, RunConfig().checkpoint_every)
    for m in EMBEDDED_DEFAULTS:                        # the written-out table agrees with the run's
        tiny, sd = EMBEDDED_DEFAULTS[m]["steps"], SD_DEFAULTS[m]["steps"]
        name = "tuneqdm" if m.startswith("tuneqdm") else m
        assert re.search(rf"\b{re.escape(name)}(\(-s1, -s2\))? {tiny}/{sd}\b" if tiny != sd
                         else rf"\b{re.escape(name)}(\(-s1, -s2\))? {tiny}\b", STEP_DEFAULTS), m


def test_resume_names_only_the_changed_setting():
    import dataclasses
    from quantdream.methods.zoodip import ZoodipConfig
    from quantdream.train import _check_resume
    old = {"out": "o", "seed": 0, "acts": 0, "zoodip": dataclasses.asdict(ZoodipConfig())}
    new = {**old, "zoodip": {**old["zoodip"], "lr": 0.5}}
    with pytest.raises(ValueError) as e:
        _check_resume({"config": old}, new, "zoodip")
    changes = re.search(r"different settings \((.*)\); use", str(e.value)).group(1)
    assert changes == f"zoodip.lr: {ZoodipConfig().lr!r} -> 0.5"


# ----------------------------------------------------------------------------- generate
def generate(*argv):
    return main(["generate", "-n", "1", "--steps", "1", *map(str, argv)])


@pytest.fixture
def no_model_loading(monkeypatch):
    """Errors that must come before the model is loaded (and long before anything is rendered)."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr("quantdream.models.load.load_pipeline", refuse)


def test_generate_braces_without_an_embedding_are_refused(tmp_path, capsys, no_model_loading):
    assert generate("a {} on the beach", "--out", tmp_path / "g") == 2
    one_line_error(capsys, "generate", r"'\{\}'.*no --embedding or --adapter")
    assert not (tmp_path / "g").exists()


def test_generate_out_is_checked_before_rendering(tmp_path, capsys, no_model_loading):
    (tmp_path / "taken.png").write_bytes(b"mine")
    assert generate("a bag", "--out", tmp_path / "taken.png") == 2
    one_line_error(capsys, "generate", r"--out '.*taken.png' is a file; give a folder")
    assert (tmp_path / "taken.png").read_bytes() == b"mine"
    if Path("/sys").is_dir():
        assert generate("a bag", "--out", "/sys/quantdream-images") == 2
        one_line_error(capsys, "generate", r"cannot create 'quantdream-images' in '/sys'")


def test_generate_an_unavailable_device_is_refused(tmp_path, capsys, no_model_loading):
    assert generate("a bag", "--device", "cuda:99", "--out", tmp_path / "g") == 2
    one_line_error(capsys, "generate", r"--device cuda:99: torch sees \d+ CUDA device\(s\)")
    assert not (tmp_path / "g").exists()


def test_generate_a_damaged_embedding_is_refused(tmp_path, capsys, no_model_loading):
    bad = tmp_path / "learned_embeds.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert generate("a {}", "--embedding", bad, "--out", tmp_path / "g") == 2
    one_line_error(capsys, "generate", r"--embedding: cannot read embedding file")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("flag,tensors,match", [
    ("--embedding", {"<x>": torch.zeros(1, 1024)},
     r"--embedding .* is 1024 wide \(SD-2.x\) but this model's text encoder is 768 wide \(SD-1.x\)"),
    ("--adapter", {"<x>": torch.zeros(1, 1024)}, r"--adapter .* is 1024 wide \(SD-2.x\)"),
    ("--embedding", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
     r"is an SDXL embedding \(clip_l 768 \+ clip_g 1280 wide.*one 768-wide text encoder"),
])
def test_generate_an_embedding_of_another_width_is_refused(tiny_model, tmp_path, capsys, flag, tensors, match):
    f = tmp_path / "learned_embeds.safetensors"
    save_file(tensors, str(f))
    assert generate("a {}", "--model", tiny_model, flag, f, "--out", tmp_path / "g") == 2
    one_line_error(capsys, "generate", match)
    assert not (tmp_path / "g").exists()


def test_personalize_an_initial_embedding_of_another_width_is_refused(tiny_model, photos, tmp_path, capsys):
    f = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(f))
    assert main(personalize_args(tiny_model, photos, tmp_path / "run", "--init-embedding", str(f))) == 2
    one_line_error(capsys, "personalize", r"SDXL embedding")
    assert not (tmp_path / "run").exists()


def test_generate_warns_when_no_prompt_uses_the_embeddings_token(tiny_model, tmp_path, caplog):
    f = tmp_path / "emb.safetensors"
    save_file({"<my-bag>": torch.randn(1, 768) * 0.01}, str(f))
    assert generate("a photo of a bag", "--model", tiny_model, "--embedding", f, "--out", tmp_path / "g") == 0
    assert "no prompt uses '<my-bag>'" in caplog.text and (tmp_path / "g" / "grid.png").is_file()


# ----------------------------------------------------------------------------- quantized folders
@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    assert main(["quantize", "--model", str(tiny_model), "--weights", "int8", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage,match", [
    ("wider_unet", r"mixes architectures: its UNet reads 1024-wide text but its text encoder\(s\) give 768"),
    ("claims_tiny", r"says it was made from the embedded model \('tiny'\) but its UNet is another architecture"),
    ("config_only", r"weights come from another architecture than unet/config.json describes"),
])
def test_a_quantized_folder_of_another_architecture_is_refused(quantized, tmp_path, capsys, damage, match):
    from quantdream.models.embedded import PACKAGE_MODEL_DIR
    bad = shutil.copytree(quantized, tmp_path / "bad")
    ucfg = json.loads((bad / "unet" / "config.json").read_text())
    index = json.loads((bad / "quantdream.json").read_text())
    if damage == "wider_unet":
        ucfg["cross_attention_dim"] = 1024
    elif damage == "claims_tiny":                      # same widths, another UNet (e.g. another latent size)
        index["config"]["source"] = str(PACKAGE_MODEL_DIR)
        ucfg["sample_size"] = ucfg["sample_size"] * 4
    else:
        ucfg["block_out_channels"] = [c * 2 for c in ucfg["block_out_channels"]]
        index["config"]["source"] = str(tmp_path / "elsewhere")
    (bad / "unet" / "config.json").write_text(json.dumps(ucfg))
    (bad / "quantdream.json").write_text(json.dumps(index))
    assert generate("a bag", "--model", bad, "--out", tmp_path / "g") == 2
    one_line_error(capsys, "generate", match)
    assert not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------- the demo script
def test_demo_with_an_unknown_subject_lists_the_known_ones(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env={**os.environ, "SUBJECT": "purple_hat"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "unknown SUBJECT 'purple_hat'" in r.stderr
    assert "teal_bag" in r.stderr and "salmon_sneaker" in r.stderr


# ----------------------------------------------------------------------------- sample grids on large models
def test_a_grid_drawn_one_image_at_a_time_is_the_batched_grid(frozen_tiny):
    """Large models draw grids one image at a time (memory); the same noise gives the same images."""
    from quantdream.methods.base import DenoisingObjective, add_placeholder
    from quantdream.train import sample_grid
    c = frozen_tiny
    ph = add_placeholder(c["tokenizer"], c["text_encoder"], "<grid-bag>", "bag")
    obj = DenoisingObjective(c["tokenizer"], c["text_encoder"], c["unet"], c["scheduler"], ph)
    kw = dict(prompts=["a photo of a {}", "a {} on a green background"], per_prompt=2, steps=3, guidance=4.0,
              seed=0, latent_shape=(c["unet"].config.in_channels, 16, 16),
              scaling=float(c["vae"].config.scaling_factor))
    batched = sample_grid(obj, c["vae"], c["scheduler"].config, ph.init_vectors, ph, **kw)
    single = sample_grid(obj, c["vae"], c["scheduler"].config, ph.init_vectors, ph, one_at_a_time=True, **kw)
    assert batched.shape == single.shape and batched.dtype == torch.uint8
    assert (batched.int() - single.int()).abs().max().item() <= 1


def test_grid_decoding_in_tiles_restores_the_autoencoder(frozen_tiny, monkeypatch):
    from quantdream.train import _decode
    vae = frozen_tiny["vae"]
    before = vae.tile_sample_min_size, vae.tile_latent_min_size
    calls = []
    real = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda z, **k: calls.append(z.shape) or real(z, **k))
    z = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, tiled = _decode(vae, z), _decode(vae, z, tile=32)
    assert calls and tiled.shape == plain.shape and torch.isfinite(tiled).all()
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == before
    with torch.no_grad():
        assert torch.equal(_decode(vae, z, tile=64), plain)        # the image fits one tile: plain decoding
