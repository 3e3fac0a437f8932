"""A folder written by `quantdream quantize` is a model every command takes (--model DIR), and the
low-memory mode (--low-memory) changes the resident peak, not the result."""
import copy
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from quantdream.cli.main import main
from quantdream.memory import chunk_feed_forward, drop_vae_parts, low_memory_unet
from quantdream.models.embedded import LATENT_CHANNELS
from quantdream.models.lean_up import resnet_on_parts as on_parts
from quantdream.quant import quantize_model
from quantdream.quant.io import load_quantized


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(3):
        a = np.full((40, 40, 3), rng.integers(0, 255, 3), np.uint8)
        a[10:30, 10:30] = (30, 200, 30)
        Image.fromarray(a).save(d / f"{i:02d}.png")
    return d


def quantize(model, out, *extra):
    assert main(["quantize", "--model", str(model), "--weights", "int8", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def folder_fp32(tiny_model, tmp_path_factory):
    """Non-quantized tensors kept fp32: the folder holds exactly the model that --weights int8 builds."""
    return quantize(tiny_model, tmp_path_factory.mktemp("q") / "int8-fp32", "--float-dtype", "fp32")


@pytest.fixture(scope="module")
def folder_fp16(tiny_model, tmp_path_factory):
    return quantize(tiny_model, tmp_path_factory.mktemp("q") / "int8-fp16")


def personalize(model, photos, out, *extra):
    return main(["personalize", "--images", str(photos), "--token", "<my-bag>", "--init-word", "bag",
                 "--model", str(model), "--out", str(out), "--threads", "1", "--steps", "3",
                 "--set", "sample_steps=2", "--set", "sample_images=1", *extra])


@pytest.mark.slow
def test_a_quantized_folder_trains_the_same_token_as_quantizing_on_the_fly(tiny_model, folder_fp32, photos, tmp_path):
    assert personalize(tiny_model, photos, tmp_path / "fly", "--weights", "int8") == 0
    assert personalize(folder_fp32, photos, tmp_path / "folder") == 0
    a = load_file(str(tmp_path / "fly" / "learned_embeds.safetensors"))["<my-bag>"]
    b = load_file(str(tmp_path / "folder" / "learned_embeds.safetensors"))["<my-bag>"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    run = json.loads((tmp_path / "folder" / "run.json").read_text())
    assert run["weights"] == "int8" and run["acts"] is None and run["unet_forward_passes"] == 9


@pytest.mark.slow
def test_low_memory_run_from_an_fp16_folder_finishes_and_renders(folder_fp16, photos, tmp_path):
    out = tmp_path / "run"
    assert personalize(folder_fp16, photos, out, "--low-memory") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["unet_forward_passes"] == 9 and np.isfinite(run["final_loss"])
    assert (out / "samples" / "step_000003.png").is_file()       # the decoder survives the dropped encoder
    gen = tmp_path / "gen"
    assert main(["generate", "a {} on a green background", "--embedding", str(out / "learned_embeds.safetensors"),
                 "--model", str(folder_fp16), "--out", str(gen), "-n", "1", "--steps", "2"]) == 0
    assert (gen / "grid.png").is_file()


@pytest.mark.parametrize("extra,match", [
    (("--weights", "int4"), r"--weights int4: .* quantized folder whose UNet is int8"),
    (("--method", "dreambooth"), r"--method dreambooth trains on a float model, but .* quantized folder"),
    (("--acts", "8"), r"--acts 8 with a quantized folder: calibrate when quantizing"),
])
def test_what_a_quantized_folder_cannot_do_is_refused_clearly(folder_fp16, photos, tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert personalize(folder_fp16, photos, out, *extra) != 0
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("damage,match", [
    ("corrupt", r"quantdream.json is not valid JSON"),
    ("no_tokenizer", r"a pipeline also needs tokenizer: re-run `quantdream quantize`"),
])
def test_a_damaged_folder_is_refused_clearly(folder_fp16, photos, tmp_path, capsys, damage, match):
    import shutil
    bad = shutil.copytree(folder_fp16, tmp_path / "bad")
    index = bad / "quantdream.json"
    if damage == "corrupt":
        index.write_text("{not json")
    else:
        d = json.loads(index.read_text())
        del d["components"]["tokenizer"]
        index.write_text(json.dumps(d))
    out = tmp_path / "run"
    assert personalize(bad, photos, out) != 0
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


def test_narrow_token_table_gives_the_same_text_features(folder_fp16):
    wide = load_quantized(folder_fp16, ["text_encoder"])["text_encoder"]
    narrow = load_quantized(folder_fp16, ["text_encoder"], narrow_embeddings=True)["text_encoder"]
    table = narrow.get_input_embeddings().weight
    assert table.dtype == torch.float16 and wide.get_input_embeddings().weight.dtype == torch.float32
    ids = torch.randint(0, table.shape[0], (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(narrow(ids)[0], wide(ids)[0], rtol=0, atol=0)



def _mapped_files(ptr: int) -> list[str]:
    """Files whose mapping in this process contains address ``ptr`` (Linux /proc/self/maps)."""
    hits = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) >= 6:
            hits.append(parts[5])
    return hits


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_narrow_token_table_is_mapped_from_the_file_and_writable_privately(folder_fp16):
    te = load_quantized(folder_fp16, ["text_encoder"], narrow_embeddings=True)["text_encoder"]
    table = te.get_input_embeddings().weight
    wfile = folder_fp16 / "text_encoder" / "quantized.safetensors"
    assert _mapped_files(table.data_ptr()) == [str(wfile.resolve())]      # not a heap copy
    before = wfile.read_bytes()
    with torch.no_grad():
        table[3] = 1.0                                                     # what add_placeholder/write_rows do
    assert wfile.read_bytes() == before                                    # copy-on-write: the file is untouched
    assert torch.all(table[3] == 1.0)
    wide = load_quantized(folder_fp16, ["text_encoder"])["text_encoder"].get_input_embeddings().weight
    assert _mapped_files(wide.data_ptr()) != [str(wfile.resolve())]


def test_a_new_token_grows_a_mapped_table_without_copying_it(folder_fp16):
    from quantdream.methods.base import GrownEmbedding, add_placeholder, write_rows
    parts = load_quantized(folder_fp16, ["text_encoder", "tokenizer"], narrow_embeddings=True)
    te, tok = parts["text_encoder"], parts["tokenizer"]
    ref = load_quantized(folder_fp16, ["text_encoder", "tokenizer"])        # resized the stock way
    wfile = str((folder_fp16 / "text_encoder" / "quantized.safetensors").resolve())
    ph = add_placeholder(tok, te, "<my-a>", "bag", num_vectors=2)
    ph_ref = add_placeholder(ref["tokenizer"], ref["text_encoder"], "<my-a>", "bag", num_vectors=2)
    emb = te.get_input_embeddings()
    assert isinstance(emb, GrownEmbedding) and _mapped_files(emb.weight.data_ptr()) == [wfile]
    assert ph.ids == ph_ref.ids and emb.num_embeddings == len(tok) == emb.weight.shape[0] + 2
    theta = torch.randn(2, emb.embedding_dim, generator=torch.Generator().manual_seed(0)).half().float()
    write_rows(te, ph, theta)                                               # (fp16 values: the table's dtype)
    write_rows(ref["text_encoder"], ph_ref, theta)
    ids = tok(f"a {ph.text} next to a bag", padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():       # the grown table and the resized one give the same text features
        torch.testing.assert_close(te(ids)[0], ref["text_encoder"](ids)[0], rtol=0, atol=0)
    add_placeholder(tok, te, "<my-b>", "bag")                                # a second token grows it again
    assert emb.extra_rows.shape[0] == 3 and torch.equal(emb.extra_rows[:2], theta.half())

# ----------------------------------------------------------------------------- the low-memory parts
def test_chunked_feed_forward_gives_the_same_output_for_any_length(frozen_tiny):
    unet = frozen_tiny["unet"]
    x = torch.randn(2, LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 32, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(x, 500, cond).sample
        assert chunk_feed_forward(unet, tokens=7) > 0           # 7 divides none of the sequence lengths
        after = unet(x, 500, cond).sample
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert all("forward" not in k for k in unet.state_dict())    # parameter names unchanged


@pytest.mark.parametrize("weights", ["none", "int8", "int4"])
def test_up_blocks_without_the_skip_concatenation_give_the_same_output(frozen_tiny, weights, monkeypatch):
    """memory.low_memory_unet: concatenation-free up blocks (models/lean_up.py) that free each skip once read,
    chunked feed-forwards and weight rebuilds; the same UNet output up to float rounding."""
    from quantdream.models import lean_up
    unet = copy.deepcopy(frozen_tiny["unet"])
    if weights != "none":
        quantize_model(unet, weights, group_size=32)
    resnets = [r for b in unet.up_blocks for r in b.resnets]
    assert all(lean_up.covered(r) for r in resnets)             # every up resnet of this UNet takes the new path
    monkeypatch.setattr(lean_up, "BLOCK_ELEMENTS", 2 * 16 * 16 * 5)   # blocks of 5 channels: not group-aligned
    x = torch.randn(2, LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 32, 768, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 800])
    with torch.no_grad():
        before = unet(x, t, cond).sample
        low_memory_unet(unet)                                    # the whole low-memory UNet, as ZOODiP runs it
        assert all("forward" in vars(b) for b in unet.up_blocks)
        calls, skips = [], []
        monkeypatch.setattr(lean_up, "resnet_on_parts", lambda *a: calls.append(1) or on_parts(*a))
        hook = unet.down_blocks[0].register_forward_hook(lambda m, a, out: skips.extend(out[1]))
        after = unet(x, t, cond).sample
        hook.remove()
    assert len(calls) == len(resnets)
    assert skips and all(s.untyped_storage().nbytes() == 0 for s in skips)   # each skip freed once read
    torch.testing.assert_close(after, before, rtol=1e-4, atol=2e-5)
    assert all("forward" not in k for k in unet.state_dict())
    x.requires_grad_(True)                                       # autograd keeps diffusers' own forward
    unet(x, t, cond).sample.sum().backward()
    assert len(calls) == len(resnets) and x.grad is not None


def test_dropped_autoencoder_parts_say_why(frozen_tiny):
    vae = copy.deepcopy(frozen_tiny["vae"])
    drop_vae_parts(vae)
    with pytest.raises(RuntimeError, match="freed by the low-memory mode after the photos were encoded"):
        vae.encode(torch.zeros(1, 3, 64, 64))
    assert vae.decode(torch.zeros(1, LATENT_CHANNELS, 16, 16)).sample.shape == (1, 3, 64, 64)
    drop_vae_parts(vae, decoder=True)
    with pytest.raises(RuntimeError, match="draws no sample grids"):
        vae.decode(torch.zeros(1, LATENT_CHANNELS, 16, 16))


@pytest.mark.slow
def test_sample_images_zero_makes_no_grids(folder_fp16, photos, tmp_path):
    out = tmp_path / "run"
    assert personalize(folder_fp16, photos, out, "--low-memory", "--set", "sample_images=0") == 0
    assert (out / "learned_embeds.safetensors").is_file()
    assert not list(out.rglob("step_*.png"))


@pytest.mark.slow
def test_a_calibrated_w8a8_folder_trains_and_says_so(tiny_model, photos, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bag on a green background\n")
    folder = quantize(tiny_model, tmp_path / "w8a8", "--acts", "8", "--calib-prompts", str(prompts),
                      "--calib-steps", "2")
    out = tmp_path / "run"
    assert personalize(folder, photos, out, "--set", "sample_images=0") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["weights"] == "int8" and run["acts"] == 8
