"""Quantized folders and scale files: round trips, refusals that leave nothing behind, clear errors."""
import json

import pytest
import torch
from safetensors import safe_open

from quantdream.models.arch import tiny_components
from quantdream.quant import (enable_scale_training, load_scales, quantize_model, quantized_layers, save_scales,
                              scales_state_dict)
from quantdream.quant.activations import calibrate_activations
from quantdream.quant.io import INDEX, load_quantized, save_quantized, write_safetensors


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a busy 2-core machine are much faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return tiny_components(seed=0)


def _unet_inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor(100 + 300 * i),
             "encoder_hidden_states": torch.randn(1, 5, 32, generator=g)} for i in range(n)]


def _outputs(c):
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        return (c["text_encoder"](ids)[0], c["unet"](**_unet_inputs(1, seed=5)[0]).sample,
                c["vae"].encode(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))).latent_dist.mean)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, weights):
    c = {k: quantize_model(m, weights, group_size=32) for k, m in tiny_components(seed=1).items()}
    calibrate_activations(c["unet"], _unet_inputs(2), bits=8)
    ref = _outputs(c)
    save_quantized(c, tmp_path / "q", {"weights": weights})
    loaded = load_quantized(tmp_path / "q")
    for a, b in zip(ref, _outputs(loaded)):
        assert torch.equal(a, b)
    assert all(not p.is_meta for m in loaded.values() for p in m.parameters())


def test_files_are_standard_safetensors_and_fp16_floats_shrink(tmp_path, tiny):
    c = {"text_encoder": quantize_model(tiny_components(seed=2)["text_encoder"], "int8")}
    save_quantized(c, tmp_path / "a")
    save_quantized(c, tmp_path / "b", float_dtype="fp16")
    fa, fb = (tmp_path / p / "text_encoder" / "quantized.safetensors" for p in "ab")
    assert fb.stat().st_size < fa.stat().st_size
    with safe_open(str(fb), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("token_embedding.weight"))
        fc1 = next(k for k in f.keys() if k.endswith("layers.0.mlp.fc1.scale"))[:-len("scale")]
        assert f.get_tensor(key).dtype == torch.float16
        assert f.get_tensor(fc1 + "scale").dtype == torch.float32
        assert f.get_tensor(fc1 + "qweight").dtype == torch.int8
    te = load_quantized(tmp_path / "b")["text_encoder"]
    assert te.get_input_embeddings().weight.dtype == torch.float32


def test_drop_leaves_submodules_unloaded(tmp_path):
    c = {"vae": quantize_model(tiny_components(seed=3)["vae"], "int8")}
    save_quantized(c, tmp_path / "q")
    vae = load_quantized(tmp_path / "q", drop={"vae": ["decoder"]})["vae"]
    vae.encode(torch.randn(1, 3, 16, 16))
    with pytest.raises(RuntimeError, match="vae.decoder was not loaded"):
        vae.decode(torch.randn(1, 4, 8, 8))


def test_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="stores diffusers or transformers models"):
        save_quantized({"x": torch.nn.Linear(2, 2)}, tmp_path / "q")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
        save_quantized(tiny_components(), tmp_path / "busy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(tmp_path / "nope")
    (tmp_path / "odd").mkdir()
    with pytest.raises(ValueError, match="unknown folder layout"):
        load_quantized(tmp_path / "odd")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="float diffusers pipeline, not a quantized folder"):
        load_quantized(tmp_path / "pipe")
    c = {"text_encoder": quantize_model(tiny_components()["text_encoder"], "int4", group_size=32)}
    save_quantized(c, tmp_path / "q")
    index = json.loads((tmp_path / "q" / INDEX).read_text())
    with pytest.raises(ValueError, match="has no component"):
        load_quantized(tmp_path / "q", ["unet"])
    (tmp_path / "q" / INDEX).write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99.*reads version 1"):
        load_quantized(tmp_path / "q")
    layers = index["components"]["text_encoder"]["layers"]
    layers[next(iter(layers))]["bits"] = 3
    (tmp_path / "q" / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="3-bit weights are not supported"):
        load_quantized(tmp_path / "q")


def test_load_refuses_a_weights_file_that_does_not_match(tmp_path):
    c = {"text_encoder": quantize_model(tiny_components()["text_encoder"], "int8")}
    save_quantized(c, tmp_path / "q")
    w = tmp_path / "q" / "text_encoder" / "quantized.safetensors"
    write_safetensors(w, [("final_layer_norm.weight", torch.ones(32))])
    with pytest.raises(ValueError, match="does not match its CLIPTextModel config: .* tensors missing"):
        load_quantized(tmp_path / "q")
    w.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_quantized(tmp_path / "q")


def _trained_scales_unet(seed: int = 4):
    """An int8 UNet with TuneQDM scales (2 experts, s_out and s_in) moved the way 400 Adam steps move them."""
    unet = quantize_model(tiny_components(seed=seed)["unet"], "int8")
    enable_scale_training(unet, "out_in", num_experts=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:   # s_out ~ 1e-3 moves by tens of %, s_in (1) by ~1e-4
                p.add_(torch.randn(p.shape, generator=g) * (0.3 * p.abs() if p.mean() < 0.5 else 1e-4))
    return unet


def test_scales_round_trip_and_refused_load_leaves_model_unchanged(tmp_path):
    unet = _trained_scales_unet()
    path = save_scales(unet, tmp_path / "scales.safetensors", dtype="float32")
    x = _unet_inputs(1)[0]
    with torch.no_grad():
        ref = unet(**x).sample
    fresh = quantize_model(tiny_components(seed=4)["unet"], "int8")
    load_scales(fresh, path)  # enables scale training with the file's settings
    with torch.no_grad():
        assert torch.equal(fresh(**x).sample, ref)
    other = quantize_model(tiny_components(seed=4)["unet"], "int8")
    enable_scale_training(other, "out", num_experts=2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="holds mode=out_in, num_experts=2"):
        load_scales(other, path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scales(other, tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        save_scales(unet, tmp_path / "x.safetensors", dtype="int8")


def test_format_1_scale_file_still_loads(tmp_path):
    """Files written before format 2: absolute float32 scales, no "encoding" key."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    unet = _trained_scales_unet()
    new = save_scales(unet, tmp_path / "new.safetensors", dtype="float32")
    with safe_open(str(new), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "encoding"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={**meta, "format_version": "1"})
    fresh = quantize_model(tiny_components(seed=4)["unet"], "int8")
    load_scales(fresh, tmp_path / "v1.safetensors")
    assert all(torch.equal(v, scales_state_dict(fresh)[k]) for k, v in scales_state_dict(unet).items())
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "format_version": "9"})
    with pytest.raises(ValueError, match="format version 9; this quantdream reads versions 1 to 2"):
        load_scales(quantize_model(tiny_components(seed=4)["unet"], "int8"), tmp_path / "v9.safetensors")


def test_float16_scale_file_holds_changes_half_the_size(tmp_path):
    from safetensors import safe_open
    unet = _trained_scales_unet()
    full = save_scales(unet, tmp_path / "full.safetensors", dtype="float32")
    half = save_scales(unet, tmp_path / "half.safetensors")               # the default
    data = sum(t.numel() for t in scales_state_dict(unet).values())
    assert full.stat().st_size - half.stat().st_size == pytest.approx(2 * data, rel=0.01)
    with safe_open(str(half), framework="pt") as f:
        assert f.metadata()["encoding"] == "delta" and all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    fresh = quantize_model(tiny_components(seed=4)["unet"], "int8")
    load_scales(fresh, half)
    want, got = scales_state_dict(unet), scales_state_dict(fresh)
    for name, layer in quantized_layers(unet):
        for j in range(2):
            for kind, start in (("s_out", layer.scale), ("s_in", torch.ones(()))):
                k = f"{name}.{kind}.{j}"
                change = (want[k] - start).abs()
                # float16 keeps 11 significant bits of the change; a float16 *value* near 1 could not hold
                # s_in's ~1e-4 change at all (spacing 2^-10 there)
                assert ((got[k] - want[k]).abs() <= change * 2 ** -11 + 1e-7).all(), k
    assert (got[f"{name}.s_in.0"] != 1).any()
    x = _unet_inputs(1)[0]
    base = quantize_model(tiny_components(seed=4)["unet"], "int8")
    with torch.no_grad():
        ref, out, untrained = unet(**x).sample, fresh(**x).sample, base(**x).sample
    # what float16 loses is a thousandth of what the training changed in the output
    assert (out - ref).norm() < 1e-3 * (ref - untrained).norm()
