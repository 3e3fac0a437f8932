"""`quantdream personalize` end to end on a random tiny model: outputs that stock diffusers loads,
resume after Ctrl-C, and a clear error with no output folder for every bad input."""
import json
import os
import signal
import tomllib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from quantdream.cli.main import main
from quantdream.train import build_config, personalize


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(4):
        a = np.full((48, 48, 3), rng.integers(0, 255, 3), np.uint8)
        a[12:36, 12:36] = (200, 30, 30)
        Image.fromarray(a).save(d / f"{i:02d}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def args(model, images, out, *extra):
    return ["personalize", "--images", str(images), "--token", "<my-bag>", "--init-word", "bag",
            "--model", str(model), "--weights", "none", "--out", str(out), "--threads", "1", *extra]


def cfg(model, images, out, **kw):
    base = dict(images=str(images), token="<my-bag>", init_word="bag", model=str(model), weights="none",
                out=str(out), threads=1, sample_every=0, sample_steps=2, sample_images=1)
    base.update(kw)
    return build_config(overrides=base)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("method,weights,passes", [("zoodip", "int8", 9), ("zoodip", "none", 9), ("ti", "none", 3),
                                                   ("ti", "int8", 3)])
def test_three_step_cli_run_loads_in_stock_diffusers(tiny_model, photos, tmp_path, method, weights, passes):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "run"
    rc = main(args(tiny_model, photos, out, "--method", method, "--steps", "3", "--export-a1111",
                   "--weights", weights, "--set", "sample_steps=2", "--set", "sample_images=1"))
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method and run["steps"] == 3 and run["unet_forward_passes"] == passes
    assert run["weights"] == weights and run["weight_bits"] == {"int8": 8, "none": 32}[weights]
    assert run["seconds"] > 0 and np.isfinite(run["final_loss"])
    assert "peak_memory_training" in run
    assert (out / "samples" / "step_000003.png").is_file() and (out / "loss.png").is_file()
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["steps"] == 3 and resolved["method"] == method and resolved[method]["lr"] > 0
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert list(saved) == ["<my-bag>"] and saved["<my-bag>"].shape == (1, 768)
    a1111 = torch.load(out / "learned_embeds.pt", weights_only=True)
    assert torch.equal(a1111["string_to_param"]["*"], saved["<my-bag>"])
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.load_textual_inversion(str(out))
    tid = pipe.tokenizer.convert_tokens_to_ids("<my-bag>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid], saved["<my-bag>"][0])
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.encode("bag", add_special_tokens=False)[0]]
    assert not torch.equal(saved["<my-bag>"][0], init)               # it trained


@pytest.mark.slow
def test_multi_vector_token_and_resume_from_the_written_config(tiny_model, photos, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "mv"

    def interrupt(info):
        os.kill(os.getpid(), signal.SIGINT)
    personalize(cfg(tiny_model, photos, out, steps=3, num_vectors=2), callback=interrupt)
    # the resolved config.toml is enough to continue
    assert main(["personalize", "--config", str(out / "config.toml"), "--resume"]) == 0
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert saved["<my-bag>"].shape == (2, 768)
    assert json.loads((out / "run.json").read_text())["steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.load_textual_inversion(str(out))
    assert pipe.tokenizer.convert_tokens_to_ids("<my-bag>_1") != pipe.tokenizer.unk_token_id
    assert pipe.maybe_convert_prompt("a <my-bag>", pipe.tokenizer) == "a <my-bag> <my-bag>_1"


@pytest.mark.slow
def test_sd2_width_tokens(photos, tmp_path):
    """A 1024-wide text encoder (SD-2.x shape) gives a [1, 1024] embedding that stock diffusers loads."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    from quantdream.models import embedded
    torch.manual_seed(0)
    c = embedded.build_components()
    tc = embedded.text_config(c["tokenizer"])
    tc.hidden_size, tc.num_attention_heads, tc.projection_dim = 1024, 16, 1024
    c["text_encoder"] = CLIPTextModel(tc)
    c["unet"] = UNet2DConditionModel(**{**embedded.UNET_CONFIG, "cross_attention_dim": 1024})
    model = tmp_path / "sd2ish"
    StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(model))
    personalize(cfg(model, photos, tmp_path / "out", steps=2))
    saved = load_file(str(tmp_path / "out" / "learned_embeds.safetensors"))
    assert saved["<my-bag>"].shape == (1, 1024)
    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.load_textual_inversion(str(tmp_path / "out"))


@pytest.mark.slow
def test_resume_after_interrupt_matches_an_uninterrupted_run(tiny_model, photos, tmp_path):
    kw = dict(steps=5, zoodip={"tau": 2}, checkpoint_every=2)
    full = personalize(cfg(tiny_model, photos, tmp_path / "full", **kw))

    def interrupt(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)                       # Ctrl-C, handled by graceful_interrupt

    part = personalize(cfg(tiny_model, photos, tmp_path / "cut", **kw), callback=interrupt)
    assert not part.completed and part.step == 3
    assert not (tmp_path / "cut" / "learned_embeds.safetensors").exists()   # nothing that looks complete
    assert not (tmp_path / "cut" / "run.json").exists()
    with pytest.raises(ValueError, match="already exists and is not empty.*--resume"):
        personalize(cfg(tiny_model, photos, tmp_path / "cut", **kw))
    done = personalize(cfg(tiny_model, photos, tmp_path / "cut", resume=True, **kw))
    assert done.completed and done.step == 5
    assert torch.equal(done.theta, full.theta)
    assert done.losses == pytest.approx(full.losses, abs=0)
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["steps"] == 5 and run["unet_forward_passes"] == 15
    assert (tmp_path / "cut" / "snapshots" / "step_000002.safetensors").is_file()


@pytest.mark.slow
def test_resume_refuses_changed_settings(tiny_model, photos, tmp_path):
    def interrupt(info):
        os.kill(os.getpid(), signal.SIGINT)
    personalize(cfg(tiny_model, photos, tmp_path / "r", steps=3), callback=interrupt)
    with pytest.raises(ValueError, match=r"different settings \(seed: 0 -> 1\)"):
        personalize(cfg(tiny_model, photos, tmp_path / "r", steps=3, seed=1, resume=True))


def test_resume_accepts_a_setting_added_later_at_its_default():
    """A checkpoint written before zoodip gained vocab_directions resumes when the new setting is at its default."""
    import dataclasses
    from quantdream.methods.zoodip import ZoodipConfig
    from quantdream.train import _check_resume
    new = {"out": "o", "seed": 0, "acts": 0, "zoodip": dataclasses.asdict(ZoodipConfig())}
    old = {**new, "zoodip": {k: v for k, v in new["zoodip"].items() if k != "vocab_directions"}}
    _check_resume({"config": old}, new, "zoodip")
    changed = {**new, "zoodip": {**new["zoodip"], "vocab_directions": 16}}
    with pytest.raises(ValueError, match=r"different settings \(zoodip.vocab_directions: unset -> 16\)"):
        _check_resume({"config": old}, changed, "zoodip")


# ----------------------------------------------------------------------------- bad input
def bad_image_folder(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "00.png")
    (d / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def empty_folder(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.txt").write_text("x")
    return d


@pytest.mark.parametrize("make,kw,exc,match", [
    (lambda t, p: t / "nope", {}, FileNotFoundError, "image folder .*nope' does not exist"),
    (lambda t, p: empty_folder(t), {}, ValueError, r"no images in .*empty'.*readme.txt"),
    (lambda t, p: bad_image_folder(t), {}, ValueError, r"cannot read image '01.png'.*remove or replace"),
    (lambda t, p: p, {"token": "bag"}, ValueError, r"--token 'bag' is already in the tokenizer's vocabulary"),
    (lambda t, p: p, {"init_word": "stuffed animal"}, ValueError, r"'stuffed animal' splits into 2 tokens"),
    (lambda t, p: p, {"zoodip": {"nn": 4}}, ValueError, r"unknown setting zoodip.nn; did you mean zoodip.n\?"),
    (lambda t, p: p, {"zoodip": {"lr": "fast"}}, ValueError, r"zoodip.lr = 'fast' should be a float"),
    (lambda t, p: p, {"method": "dreambth"}, ValueError, "unknown method 'dreambth'; choose one of zoodip, zoodip-fast, ti, gf-ti, dreambooth"),
    (lambda t, p: p, {"captions": "/no/such.json"}, FileNotFoundError, "caption file '/no/such.json' does not exist"),
    (lambda t, p: p, {"steps": -1}, ValueError, "--steps must be >= 0"),
])
def test_bad_input_gets_a_clear_error_and_no_output(tiny_model, photos, tmp_path, make, kw, exc, match):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        personalize(cfg(tiny_model, make(tmp_path, photos), out, **{"steps": 2, **kw}))
    assert not out.exists()


def test_width_mismatch_of_an_initial_embedding(tiny_model, photos, tmp_path):
    f = tmp_path / "sd2.safetensors"
    save_file({"<x>": torch.zeros(1, 1024)}, str(f))
    with pytest.raises(ValueError, match=r"\(1, 1024\) but this model needs \(1, 768\): 768-wide text encoder \(SD-1.x\)"):
        personalize(cfg(tiny_model, photos, tmp_path / "out", init_embedding=str(f)))
    assert not (tmp_path / "out").exists()


def test_caption_file_must_cover_every_image(tiny_model, photos, tmp_path):
    f = tmp_path / "caps.json"
    f.write_text(json.dumps({"00.png": "a photo of a {}"}))
    with pytest.raises(ValueError, match="has no caption for image '01.png'"):
        personalize(cfg(tiny_model, photos, tmp_path / "out", captions=str(f)))
    assert not (tmp_path / "out").exists()


def test_int8_without_the_quantization_engine(tiny_model, photos, tmp_path):
    try:
        import quantdream.quant.quantize_model  # noqa: F401
        pytest.skip("the quantization engine is present")
    except ImportError:
        pass
    try:
        from quantdream.quant import quantize_model  # noqa: F401
        pytest.skip("the quantization engine is present")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="--weights int8 needs quantdream's quantization engine"):
        personalize(cfg(tiny_model, photos, tmp_path / "out", weights="int8"))
    assert not (tmp_path / "out").exists()


def test_sdxl_and_non_models_are_refused_clearly(photos, tmp_path):
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="does not run on SDXL models .* zoodip, zoodip-fast, ti, gf-ti, lora, peqa"):
        personalize(cfg(sdxl, photos, tmp_path / "out", method="dreambooth"))
    other = tmp_path / "model.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        personalize(cfg(other, photos, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_left_alone(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="already exists and is not empty; choose a new --out$"):
        personalize(cfg(tiny_model, photos, out))
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint.pt"):
        personalize(cfg(tiny_model, photos, out, resume=True))


def test_cli_reports_errors_in_the_users_words(tiny_model, photos, tmp_path, capsys):
    rc = main(args(tiny_model, tmp_path / "missing", tmp_path / "out"))
    assert rc == 2
    assert "quantdream personalize: error: image folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_toml_config_with_command_line_overrides(tmp_path):
    from quantdream.cli.main import build_parser
    from quantdream.cli.personalize import config_from_args
    f = tmp_path / "run.toml"
    f.write_text('images = "photos"\ntoken = "<t>"\ninit_word = "bag"\nsteps = 10\n[zoodip]\nn = 4\nlr = 1\n')
    a = build_parser().parse_args(["personalize", "--config", str(f), "--steps", "20", "--out", "o",
                                   "--set", "zoodip.sg=false", "--lr", "0.02"])
    c = config_from_args(a)
    assert (c.steps, c.images, c.out) == (20, "photos", "o")
    assert c.zoodip == {"n": 4, "lr": 0.02, "sg": False}
    f.write_text("stpes = 10\n")
    with pytest.raises(ValueError, match=r"unknown setting 'stpes' in config file .*did you mean 'steps'\?"):
        build_config(str(f))
    f.write_text("steps = 'ten'\n")
    with pytest.raises(ValueError, match=r"steps = 'ten' should be a int"):
        build_config(str(f))


def test_a_partially_trained_packaged_model_says_so(tmp_path, caplog):
    import json
    import logging

    from quantdream.models import load
    (tmp_path / "training.json").write_text(json.dumps({"unet_steps": 4000, "args": {"steps": 13000}}))
    load._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="quantdream"):
        load.warn_if_partially_trained(tmp_path)
        load.warn_if_partially_trained(tmp_path)  # once per process
    assert [r.getMessage() for r in caplog.records].count(
        "the packaged embedded model is partially trained (UNet 4000 of 13000 steps): expect rough images; "
        "see docs/embedded-model.md") == 1
    caplog.clear()
    load._WARNED.clear()
    (tmp_path / "training.json").write_text(json.dumps({"unet_steps": 13000, "args": {"steps": 13000}}))
    load.warn_if_partially_trained(tmp_path)
    assert not caplog.records
