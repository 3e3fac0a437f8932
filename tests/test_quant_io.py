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
    with pytest.raises(ValueError, match="dtype 'int4'; choose one of int8, float16, float32"):
        save_scales(unet, tmp_path / "x.safetensors", dtype="int4")


def _old_format_file(unet, path, version: str, encoding: str | None):
    """A scale file as formats 1 and 2 wrote it: one tensor per layer and set, named "<layer>.<kind>.<j>"."""
    from safetensors.torch import save_file
    meta = {"format": "quantdream-scales", "format_version": version, "mode": "out_in", "num_experts": "2",
            "num_train_timesteps": "1000", "interval": "null", **({"encoding": encoding} if encoding else {})}
    tensors = scales_state_dict(unet)
    if encoding == "delta":
        start = {f"{name}.{kind}.{j}": layer.scale if kind == "s_out" else 1
                 for name, layer in quantized_layers(unet) for kind in ("s_out", "s_in") for j in range(2)}
        tensors = {k: (v - start[k]).half() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_format_1_and_2_scale_files_still_load(tmp_path):
    """Format 1: absolute float32 scales, no "encoding" key; format 2: float16 changes; both per layer."""
    unet = _trained_scales_unet()
    fresh = quantize_model(tiny_components(seed=4)["unet"], "int8")
    load_scales(fresh, _old_format_file(unet, tmp_path / "v1.safetensors", "1", None))
    assert all(torch.equal(v, scales_state_dict(fresh)[k]) for k, v in scales_state_dict(unet).items())
    fresh = quantize_model(tiny_components(seed=4)["unet"], "int8")
    load_scales(fresh, _old_format_file(unet, tmp_path / "v2.safetensors", "2", "delta"))
    got = scales_state_dict(fresh)
    assert all(torch.allclose(v, got[k], rtol=0, atol=1e-6) for k, v in scales_state_dict(unet).items())
    with pytest.raises(ValueError, match="format version 9; this quantdream reads versions 1 to 3"):
        load_scales(quantize_model(tiny_components(seed=4)["unet"], "int8"),
                    _old_format_file(unet, tmp_path / "v9.safetensors", "9", None))


def test_damaged_packed_scale_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    unet = _trained_scales_unet()
    path = save_scales(unet, tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cases = {"short": ({**tensors, "s_in.1": tensors["s_in.1"][:-1]}, meta, "its s_in set 1 does not match"),
             "no step": ({k: v for k, v in tensors.items() if k != "s_out.0.step"}, meta, "its s_out set 0"),
             "layout": (tensors, {**meta, "layout": "[["}, "no readable layout"),
             "layout entry": (tensors, {**meta, "layout": '[["conv_in", 4]]'}, "no readable layout"),
             "no layout": (tensors, {k: v for k, v in meta.items() if k != "layout"}, "no readable layout"),
             "encoding": (tensors, {**meta, "encoding": "delta-int3"}, "encoded as 'delta-int3'")}
    for name, (t, m, msg) in cases.items():
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=m)
        fresh = quantize_model(tiny_components(seed=4)["unet"], "int8")
        with pytest.raises(ValueError, match=msg):
            load_scales(fresh, tmp_path / f"{name}.safetensors")
        assert all(layer.s_out is None for _, layer in quantized_layers(fresh)), name


def _reloaded(unet, path):
    """``path`` loaded into a fresh int8 UNet: ``(key, trained, loaded, start)`` per scale entry, and how far the
    fresh UNet's output is from the trained one's, relative to how far training moved it, on one input."""
    fresh = quantize_model(tiny_components(seed=4)["unet"], "int8")
    load_scales(fresh, path)
    want, got = scales_state_dict(unet), scales_state_dict(fresh)
    entries = [(k, want[k], got[k], layer.scale if kind == "s_out" else torch.ones(()))
               for name, layer in quantized_layers(unet) for kind in ("s_out", "s_in") for j in range(2)
               for k in [f"{name}.{kind}.{j}"]]
    x = _unet_inputs(1)[0]
    base = quantize_model(tiny_components(seed=4)["unet"], "int8")
    with torch.no_grad():
        ref, out, untrained = unet(**x).sample, fresh(**x).sample, base(**x).sample
    return entries, float((out - ref).norm() / (ref - untrained).norm())


def test_int8_scale_file_rounds_each_layers_changes_a_quarter_of_the_size(tmp_path):
    unet = _trained_scales_unet()
    full = save_scales(unet, tmp_path / "full.safetensors", dtype="float32")
    small = save_scales(unet, tmp_path / "small.safetensors")               # the default
    data = sum(t.numel() for t in scales_state_dict(unet).values())
    steps = 2 * 2 * len(list(quantized_layers(unet)))          # one float32 step per layer, kind and set
    assert full.stat().st_size - small.stat().st_size == pytest.approx(3 * data - 4 * steps, abs=400)  # step entries in the header
    with safe_open(str(small), framework="pt") as f:
        assert f.metadata()["encoding"] == "delta-int8"
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.int8, torch.float32}   # codes, steps
    entries, output_error = _reloaded(unet, small)
    for k, want, got, start in entries:
        change = want - start
        step = change.abs().max() / 127
        assert ((got - want).abs() <= step / 2 * (1 + 1e-3) + 1e-7).all(), k   # half a grid step
        assert ((got - start) * change >= 0).all(), k                          # never the wrong way
    assert output_error < 1e-2


def test_float16_scale_file_holds_changes_half_the_size(tmp_path):
    unet = _trained_scales_unet()
    full = save_scales(unet, tmp_path / "full.safetensors", dtype="float32")
    half = save_scales(unet, tmp_path / "half.safetensors", dtype="float16")
    data = sum(t.numel() for t in scales_state_dict(unet).values())
    assert full.stat().st_size - half.stat().st_size == pytest.approx(2 * data, rel=0.01)
    with safe_open(str(half), framework="pt") as f:
        assert f.metadata()["encoding"] == "delta" and all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    entries, output_error = _reloaded(unet, half)
    for k, want, got, start in entries:
        # float16 keeps 11 significant bits of the change; a float16 *value* near 1 could not hold
        # s_in's ~1e-4 change at all (spacing 2^-10 there)
        assert ((got - want).abs() <= (want - start).abs() * 2 ** -11 + 1e-7).all(), k
    assert all((got != 1).any() for k, _, got, _ in entries if ".s_in." in k)    # s_in kept its change
    assert output_error < 1e-3          # what float16 loses is a thousandth of what training changed in the output
