"""Checkpoints users bring: single-file SD-1.5 / SD-2.1 / SDXL files in the original LDM layout (written
here from tiny random-weight pipelines), fp16-variant folders, folders with or without a safety checker,
and clear one-line errors for damaged files and pipelines quantdream does not support. The network is
blocked in every test: nothing may be fetched."""
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_layout import tiny_pipeline, to_ldm, write, write_tiny_arch_dir
from quantdream.cli.main import main
from quantdream.models import load, single_file

CLIP_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids for "a photo of a cat"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    load.set_prediction_type(None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny architecture configs in place of the shipped real-size ones, and one single file per
    architecture (SD-2.1 also as a legacy .ckpt), with the pipelines they were written from."""
    d = tmp_path_factory.mktemp("ckpt")
    saved, single_file.ARCH_DIR = single_file.ARCH_DIR, write_tiny_arch_dir(d / "arch")
    pipes = {a: tiny_pipeline(a) for a in ("sd15", "sd21", "sdxl")}
    files = {a: write(to_ldm(p, a), d / f"{a}.safetensors") for a, p in pipes.items()}
    files["sd21.ckpt"] = write(to_ldm(pipes["sd21"], "sd21"), d / "sd21-legacy.ckpt")
    yield pipes, files, d
    single_file.ARCH_DIR = saved


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        a = np.full((24, 24, 3), rng.integers(0, 255, 3), np.uint8)
        a[6:18, 6:18] = (200, 30, 30)
        Image.fromarray(a).save(d / f"{i:02d}.png")
    return d


def same_weights(a, b) -> bool:
    sa = {k: v for k, v in a.state_dict().items() if not k.endswith("position_ids")}
    sb = b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


# ----------------------------------------------------------------------------- single files
@pytest.mark.parametrize("arch,key,cls,prediction", [
    ("sd15", "sd15", "StableDiffusionPipeline", "epsilon"),
    ("sd21", "sd21", "StableDiffusionPipeline", "v_prediction"),
    ("sd21", "sd21.ckpt", "StableDiffusionPipeline", "v_prediction"),
    ("sdxl", "sdxl", "StableDiffusionXLPipeline", "epsilon")])
def test_single_file_loads_offline_with_every_weight(tiny, arch, key, cls, prediction):
    pipes, files, _ = tiny
    assert single_file.detect(single_file.read_keys(files[key])) == arch
    pipe = load.load_pipeline(files[key])
    assert type(pipe).__name__ == cls == load.pipeline_class(files[key]).__name__
    assert pipe.scheduler.config.prediction_type == prediction
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(pipes[arch], part):
            assert same_weights(getattr(pipes[arch], part), getattr(pipe, part)), part
    assert pipe.tokenizer("a photo of a cat").input_ids == CLIP_IDS
    assert pipe.tokenizer.pad_token == ("!" if arch == "sd21" else "<|endoftext|>")
    if arch == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_generate_renders_from_a_single_file(tiny, tmp_path, arch):
    out = tmp_path / "img"
    assert main(["generate", "a photo of a cat", "--model", str(tiny[1][arch]), "--steps", "2", "-n", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert len([f for f in out.glob("*.png") if f.name != "grid.png"]) == 1


def test_prediction_type_from_the_file_a_yaml_beside_it_or_the_flag(tiny, tmp_path):
    pipes, files, _ = tiny
    keys = single_file.read_keys(files["sd15"])
    assert single_file.prediction_type(files["sd15"], keys, "sd15") == "epsilon"
    assert single_file.prediction_type(files["sd15"], {**keys, "v_pred": ()}, "sd15") == "v_prediction"
    f = tmp_path / "base.safetensors"
    f.symlink_to(files["sd21"])
    (tmp_path / "base.yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    assert load.load_pipeline(f).scheduler.config.prediction_type == "epsilon"
    (tmp_path / "base.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert load.load_pipeline(f).scheduler.config.prediction_type == "v_prediction"
    load.set_prediction_type("epsilon")
    assert load.load_pipeline(f).scheduler.config.prediction_type == "epsilon"
    folder = tmp_path / "folder"                   # the flag also overrides a folder's scheduler config
    pipes["sd15"].save_pretrained(str(folder))
    load.set_prediction_type("v_prediction")
    assert load.load_pipeline(folder).scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="--prediction-type must be one of"):
        load.set_prediction_type("x0")


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_quantize_turns_a_single_file_into_a_quantized_folder(tiny, tmp_path, arch):
    pipes, files, _ = tiny
    out = tmp_path / "q"
    extra = ["--prediction-type", "epsilon"] if arch == "sd21" else []
    assert main(["quantize", "--model", str(files[arch]), "--out", str(out), "--weights", "int8", *extra]) == 0
    assert load.is_quantized_folder(out)
    load.set_prediction_type(None)
    q = load.load_pipeline(out)
    assert type(q).__name__ == type(pipes[arch]).__name__
    assert q.scheduler.config.prediction_type == "epsilon"         # the flag is kept in the folder
    assert q.tokenizer("a photo of a cat").input_ids == CLIP_IDS


@pytest.mark.slow
@pytest.mark.parametrize("arch,method,weights", [("sd15", "zoodip", "int8"), ("sd15", "ti", "none"),
                                                 ("sd21", "zoodip", "int8"), ("sd21", "ti", "none")])
def test_personalize_three_steps_from_a_single_file(tiny, photos, tmp_path, arch, method, weights):
    from quantdream.train import build_config, personalize
    _, files, _ = tiny
    out = tmp_path / "run"
    personalize(build_config(overrides=dict(
        images=str(photos), token="<my-cat>", init_word="cat", model=str(files[arch]), method=method,
        weights=weights, steps=3, out=str(out), threads=1, sample_every=0, sample_steps=2, sample_images=1)))
    assert (out / "learned_embeds.safetensors").is_file()
    pipe = load.load_pipeline(files[arch])          # the embedding loads back into the file's pipeline
    pipe.load_textual_inversion(str(out))
    tid = pipe.tokenizer.convert_tokens_to_ids("<my-cat>")
    assert tid == len(pipe.tokenizer) - 1
    width = pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.get_input_embeddings().weight[tid].shape == (width,)


@pytest.mark.slow
def test_personalize_sdxl_from_a_single_file(tiny, photos, tmp_path):
    """An SDXL single file trains a token in both text encoders; stock diffusers reads it back per encoder."""
    from safetensors.torch import load_file

    from quantdream.models.sdxl import load_into_pipeline
    from quantdream.train import build_config, personalize
    _, files, _ = tiny
    out = tmp_path / "run"
    personalize(build_config(overrides=dict(
        images=str(photos), token="<my-cat>", init_word="cat", model=str(files["sdxl"]), method="zoodip",
        weights="int8", steps=3, out=str(out), threads=1, sample_every=0, sample_images=0)))
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert set(saved) == {"clip_l", "clip_g"}
    pipe = load.load_pipeline(files["sdxl"])
    assert load_into_pipeline(pipe, out) == ["<my-cat>"]
    for te, tok, part in ((pipe.text_encoder, pipe.tokenizer, "clip_l"), (pipe.text_encoder_2, pipe.tokenizer_2,
                                                                           "clip_g")):
        row = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<my-cat>")]
        assert torch.equal(row.float(), saved[part][0].float())


# ----------------------------------------------------------------------------- clear errors
def _keys_file(path, keys):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    return path


@pytest.mark.parametrize("make,match", [
    (lambda d, f: d.joinpath("cut.safetensors").write_bytes(f.read_bytes()[:5000]) and d / "cut.safetensors",
     "cannot be read as a .safetensors checkpoint"),
    (lambda d, f: d.joinpath("junk.ckpt").write_bytes(b"not a checkpoint" * 10) and d / "junk.ckpt",
     "cannot be read as a .ckpt checkpoint"),
    (lambda d, f: _keys_file(d / "sd3.safetensors", {"model.diffusion_model.joint_blocks.0.x": (2,)}),
     "is a Stable Diffusion 3 checkpoint"),
    (lambda d, f: _keys_file(d / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": (2,)}), "is a Flux"),
    (lambda d, f: _keys_file(d / "lora.safetensors", {"lora_unet_down_blocks_0.alpha": ()}), "is a LoRA"),
    (lambda d, f: _keys_file(d / "refiner.safetensors", {single_file.UNET_IN: (8, 4, 3, 3),
                                                         "conditioner.embedders.0.model.ln_final.weight": (4,)}),
     "SDXL refiner"),
    (lambda d, f: _keys_file(d / "inpaint.safetensors", {single_file.UNET_IN: (8, 9, 3, 3), single_file.VAE_IN: (2,),
                                                         "cond_stage_model.transformer.x": (2,)}),
     "inpainting model"),
    (lambda d, f: _keys_file(d / "unet.safetensors", {single_file.UNET_IN: (8, 4, 3, 3),
                                                      "cond_stage_model.transformer.x": (2,)}), "has no VAE"),
])
def test_bad_single_files_get_one_line_and_nothing_written(tiny, photos, tmp_path, capsys, make, match):
    f = make(tmp_path, tiny[1]["sd15"])
    out = tmp_path / "out"
    for cmd in (["quantize", "--model", str(f), "--out", str(out)],
                ["generate", "a cat", "--model", str(f), "--out", str(tmp_path / "img.png")],
                ["personalize", "--model", str(f), "--images", str(photos), "--token", "<my-cat>", "--init-word",
                 "cat", "--steps", "3", "--out", str(out)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert not out.exists() and not (tmp_path / "img.png").exists()


def _folder(tmp_path, index, **configs):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps(index))
    for name, cfg in configs.items():
        (d / name).mkdir()
        (d / name / ("scheduler_config.json" if name == "scheduler" else "config.json")).write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("index,configs,match", [
    ({"_class_name": "StableDiffusion3Pipeline"}, {}, "Stable Diffusion 3"),
    ({"_class_name": "FluxPipeline"}, {}, "Flux"),
    ({"_class_name": "KandinskyPipeline"}, {}, "a KandinskyPipeline"),
    ({"_class_name": "StableDiffusionPipeline"}, {"scheduler": {"_class_name": "LCMScheduler"}}, "LCM-LoRA fused"),
    ({"_class_name": "StableDiffusionPipeline"}, {"unet": {"time_cond_proj_dim": 256}}, "consistency-distilled"),
])
def test_unknown_pipelines_say_what_is_supported(tmp_path, capsys, index, configs, match):
    d = _folder(tmp_path, index, **configs)
    assert main(["quantize", "--model", str(d), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and ("StableDiffusionXLPipeline" in err or "base model" in err), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- diffusers folders
def test_fp16_variant_folder_with_safety_checker_entries_loads_upcast(tiny, tmp_path):
    """An fp16-variant-only folder whose model_index names a safety checker and feature extractor it
    does not ship (as many downloads do) loads in float32, each weight the fp16 value."""
    pipes, _, _ = tiny
    src = pipes["sd15"]
    d = tmp_path / "fp16"
    half = tiny_pipeline("sd15")
    half.to(torch.float16).save_pretrained(str(d), variant="fp16")
    assert not list(d.glob("unet/diffusion_pytorch_model.safetensors"))
    assert list(d.glob("unet/diffusion_pytorch_model.fp16.safetensors"))
    index = json.loads((d / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (d / "model_index.json").write_text(json.dumps(index))
    assert load.weights_variant(d) == "fp16"
    pipe = load.load_pipeline(d)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert torch.equal(pipe.unet.conv_in.weight, src.unet.conv_in.weight.half().float())
    assert pipe.safety_checker is None
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(d), "--out", str(q), "--weights", "int8"]) == 0
    assert load.is_quantized_folder(q)


def test_damaged_weights_in_a_folder_get_one_line(tiny, tmp_path, capsys):
    d = tmp_path / "plain"
    tiny[0]["sd15"].save_pretrained(str(d))
    f = d / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    capsys.readouterr()
    assert main(["quantize", "--model", str(d), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "damaged or truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()
