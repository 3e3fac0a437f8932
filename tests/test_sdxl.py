"""SDXL personalization on a tiny random-weight SDXL-architecture folder (two text encoders, text_time
conditioning): the token in both encoders, the clip_l / clip_g export, stock diffusers loading it."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from quantdream.cli.main import main
from quantdream.train import build_config, personalize

TOKEN = "<my-bag>"


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    """StableDiffusionXLPipeline of SDXL's classes at tiny widths: clip_l 32 + clip_g 48 = 80 (the UNet's
    cross-attention width), pooled projection 16, 6 time ids x 8 = 48 (+16 = 64 added features)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from quantdream.models.arch import TINY_VAE
    from quantdream.models.embedded import SCHEDULER_CONFIG, TOKENIZER_DIR
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))

    def text(width, heads):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=heads, max_position_embeddings=tok.model_max_length,
                              projection_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=80, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64,
        transformer_layers_per_block=(1, 1))
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(text(32, 4)),
        text_encoder_2=CLIPTextModelWithProjection(text(48, 4)), tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"}))
    path = tmp_path_factory.mktemp("model") / "tiny-sdxl"
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        a = np.full((40, 40, 3), rng.integers(0, 255, 3), np.uint8)
        a[10:30, 10:30] = (200, 30, 30)
        Image.fromarray(a).save(d / f"{i:02d}.png")
    return d


def cfg(model, images, out, **kw):
    base = dict(images=str(images), token=TOKEN, init_word="bag", model=str(model), out=str(out), threads=1,
                sample_every=0, sample_steps=2, sample_images=1, steps=3)
    base.update(kw)
    return build_config(overrides=base)


def stock(model):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(pipe, prompt):
    e, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
    return e, pooled


@pytest.mark.slow
@pytest.mark.parametrize("method,weights", [("zoodip", "int8"), ("ti", "none")])
def test_sdxl_token_loads_in_stock_pipeline_for_both_encoders(sdxl_model, photos, tmp_path, method, weights):
    from quantdream.models.sdxl import SDXLObjective, SDXLPlaceholder
    out = tmp_path / "run"
    result = personalize(cfg(sdxl_model, photos, out, method=method, weights=weights))
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 3 and run["resolution"] == 16 and run["trainable_parameters"] == 80
    sd = load_file(str(out / "learned_embeds.safetensors"))
    assert set(sd) == {"clip_l", "clip_g"} and sd["clip_l"].shape == (1, 32) and sd["clip_g"].shape == (1, 48)
    assert torch.equal(torch.cat([sd["clip_l"], sd["clip_g"]], -1), result.theta)
    assert not torch.equal(result.theta, result.placeholder.init_vectors)      # training moved both parts
    assert not torch.equal(sd["clip_l"], result.placeholder.init_vectors[:, :32])
    assert not torch.equal(sd["clip_g"], result.placeholder.init_vectors[:, 32:])

    pipe = stock(sdxl_model)
    before, before_pooled = prompt_embeds(pipe, f"a photo of {TOKEN}")
    pipe.load_textual_inversion(sd["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    i, j = pipe.tokenizer.convert_tokens_to_ids(TOKEN), pipe.tokenizer_2.convert_tokens_to_ids(TOKEN)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[i], sd["clip_l"][0])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[j], sd["clip_g"][0])
    after, after_pooled = prompt_embeds(pipe, f"a photo of {TOKEN}")
    assert not torch.allclose(before, after) and not torch.allclose(before_pooled, after_pooled)
    # the conditioning trained on is the pipeline's own: same token states and pooled embedding
    from diffusers import DDPMScheduler
    ph = SDXLPlaceholder(token=TOKEN, tokens=[TOKEN], ids=[i], ids_2=[j], init_vectors=result.theta, widths=(32, 48))
    obj = SDXLObjective(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.unet,
                        DDPMScheduler.from_config(pipe.scheduler.config), ph, resolution=16)
    with torch.no_grad():
        c = obj.encode_text(result.theta[None], [f"a photo of {TOKEN}"])
    torch.testing.assert_close(c.embeds, after)
    torch.testing.assert_close(c.pooled, after_pooled)
    add = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(obj._time_ids, add)
    # and the stock pipeline renders with it
    img = pipe(f"a photo of {TOKEN}", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_sdxl_zoodip_directions_span_both_encoders(sdxl_model, photos, tmp_path):
    """ZOODiP's RGE runs over d = 32 + 48 (the normalisation's d) and moves both parts; generate loads it."""
    out = tmp_path / "run"
    seen = []
    result = personalize(cfg(sdxl_model, photos, out, method="zoodip", weights="none", steps=2),
                         callback=lambda s: seen.append((s["method"].d_eff, s["method"].estimator.divisor(80))))
    info = json.loads((out / "run.json").read_text())
    assert info["unet_forward_passes"] == 2 * 3                 # n = 2 directions + the clean token
    assert seen[0] == (80, pytest.approx(((80 + 1) / 2) ** 0.5))  # the code's sqrt((d_eff + n - 1) / n), d = 32 + 48
    delta = result.theta - result.placeholder.init_vectors
    assert delta[:, :32].abs().sum() > 0 and delta[:, 32:].abs().sum() > 0
    # an SDXL embedding starts another run (--init-embedding): both parts land in their tables
    again = personalize(cfg(sdxl_model, photos, tmp_path / "again", method="ti", weights="none", steps=1,
                            init_embedding=str(out / "learned_embeds.safetensors")))
    assert torch.equal(again.placeholder.init_vectors, result.theta)
    from quantdream.export import save_diffusers
    from quantdream.models.sdxl import load_into_pipeline
    pipe = stock(sdxl_model)
    assert load_into_pipeline(pipe, out) == [TOKEN]             # the token from the file's metadata
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[-1], result.theta[0, 32:])
    one = save_diffusers(tmp_path / "one.safetensors", "<x>", torch.zeros(1, 32))
    with pytest.raises(ValueError, match="one-encoder embedding .* needs an SDXL embedding"):
        load_into_pipeline(pipe, one)
    gen = tmp_path / "gen"
    rc = main(["generate", f"a photo of {TOKEN}", "--model", str(sdxl_model), "--embedding",
               str(out / "learned_embeds.safetensors"), "-n", "1", "--steps", "2", "--out", str(gen)])
    assert rc == 0 and (gen / "grid.png").is_file()


@pytest.mark.parametrize("method", ["dreambooth", "qlora", "tuneqdm"])
def test_sdxl_refuses_other_methods_in_one_line(sdxl_model, photos, tmp_path, method, capsys):
    out = tmp_path / "run"
    rc = main(["personalize", "--images", str(photos), "--token", TOKEN, "--init-word", "bag", "--model",
               str(sdxl_model), "--method", method, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert "SDXL" in err and "zoodip, zoodip-fast, ti, gf-ti, lora, peqa" in err and len(err.splitlines()) == 1


def test_sdxl_init_embedding_of_other_width_is_refused(sdxl_model, photos, tmp_path):
    from quantdream.export import save_diffusers
    emb = save_diffusers(tmp_path / "one.safetensors", "<x>", torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"needs \(1, 80\): clip_l 32 \+ clip_g 48"):
        personalize(cfg(sdxl_model, photos, tmp_path / "run", init_embedding=str(emb)))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,weights,files", [
    ("zoodip-fast", "int8", ["learned_embeds.safetensors"]), ("gf-ti", "int8", ["learned_embeds.safetensors"]),
    ("lora", "none", ["pytorch_lora_weights.safetensors"]), ("peqa", "int8", ["scales.safetensors"])])
def test_sdxl_other_methods_run(sdxl_model, photos, tmp_path, method, weights, files):
    out = tmp_path / "run"
    extra = {"gf_ti": {"popsize": 4, "dim": 8}} if method == "gf-ti" else {}
    token = {"token": ""} if method in ("lora", "peqa") else {}
    personalize(cfg(sdxl_model, photos, out, method=method, weights=weights, steps=2, **extra, **token))
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 2 and all(f in run["outputs"] for f in files)
    if method == "lora":      # stock SDXL pipeline loads the LoRA file
        pipe = stock(sdxl_model)
        pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_sdxl_quantized_folder_trains_zoodip(sdxl_model, photos, tmp_path):
    """`quantdream quantize` on an SDXL folder, then personalize on it (both text encoders from the folder)."""
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(sdxl_model), "--weights", "int8", "--out", str(q)]) == 0
    out = tmp_path / "run"
    result = personalize(cfg(q, photos, out, method="zoodip", steps=2, weights="auto"))
    sd = load_file(str(out / "learned_embeds.safetensors"))
    assert torch.equal(torch.cat([sd["clip_l"], sd["clip_g"]], -1), result.theta)
    assert json.loads((out / "run.json").read_text())["weights"] == "int8"


@pytest.mark.slow
def test_sdxl_low_memory_mode_gives_the_same_token(sdxl_model, photos, tmp_path):
    """--low-memory (one UNet row a call, lean up blocks, chunked feed-forwards) on SDXL's UNet: same result
    up to float rounding."""
    a = personalize(cfg(sdxl_model, photos, tmp_path / "a", method="zoodip", weights="int8", steps=2,
                        sample_images=0))
    b = personalize(cfg(sdxl_model, photos, tmp_path / "b", method="zoodip", weights="int8", steps=2,
                        sample_images=0, low_memory=True))
    torch.testing.assert_close(a.theta, b.theta, rtol=1e-4, atol=1e-4)
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
