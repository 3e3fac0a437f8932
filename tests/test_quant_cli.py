"""`quantdream quantize` end to end on a random-weight embedded-architecture pipeline folder."""
import pytest
import torch

from quantdream.cli.main import main
from quantdream.models.embedded import LATENT_CHANNELS


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("argv,err", [
    (["--weights", "int3"], "weights='int3' is not supported"),
    (["--acts", "8", "--weights", "none"], "--acts needs quantized weights"),
    (["--acts", "1"], "--acts 1: activation width must be 2..16 bits"),
    (["--acts", "8", "--calib-prompts", "/no/such/file"], "--calib-prompts /no/such/file does not exist"),
    (["--model", "/no/such/model"], "does not exist"),
])
def test_bad_arguments_get_clear_errors(tmp_path, capsys, argv, err):
    assert main(["quantize", "--out", str(tmp_path / "q"), *argv]) == 2
    assert err in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_quantize_w4a8_pipeline_folder_and_load_it(tmp_path):
    from diffusers import StableDiffusionPipeline

    from quantdream.models.embedded import build_components
    from quantdream.quant import QuantizedLayer
    from quantdream.quant.activations import QuantAttnProcessor
    from quantdream.quant.io import load_quantized
    c = build_components()
    StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bag\na small blue boot\n")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tmp_path / "pipe"), "--weights", "int4", "--acts", "8",
                 "--calib-prompts", str(prompts), "--calib-steps", "3", "--out", str(out)]) == 0
    loaded = load_quantized(out)
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(loaded)
    assert isinstance(loaded["unet"].conv_in, QuantizedLayer) and loaded["unet"].conv_in.bits == 4
    attn = loaded["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.processor, QuantAttnProcessor)
    with torch.no_grad():
        y = loaded["unet"](torch.randn(1, LATENT_CHANNELS, 16, 16), 10, encoder_hidden_states=torch.randn(1, 32, 768)).sample
    assert torch.isfinite(y).all()
    assert main(["quantize", "--model", str(tmp_path / "pipe"), "--out", str(out)]) == 2  # exists
