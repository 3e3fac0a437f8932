"""Q-Diffusion-style activation quantization on toy data and a tiny UNet."""
import pytest
import torch

from quantdream.models.arch import tiny_components
from quantdream.quant import quantize_model
from quantdream.quant.activations import (ActQuantizer, QuantAttnProcessor, act_quantizers, calibrate_activations,
                                          set_activation_quant, shortcut_splits)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a busy 2-core machine are much faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mse_search_beats_min_max_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[:5] = 40.0  # a few outliers: clipping them lowers the error for everything else
    q = ActQuantizer(4)
    q.mode = "observe"
    q(x)
    q.calibrate()
    minmax = ActQuantizer(4)
    minmax.scale[0] = (x.max() - x.min()) / 15
    minmax.zero[0] = torch.round(-x.min() / minmax.scale[0])
    assert ((q(x) - x) ** 2).mean() < ((minmax(x) - x) ** 2).mean()
    assert len(torch.unique(q(x))) <= 16


def test_shortcut_split_gives_halves_their_own_range():
    h, skip = torch.randn(2, 3, 4, 4) * 0.01, torch.randn(2, 5, 4, 4) * 10
    x = torch.cat([h, skip], 1)
    split, joint = ActQuantizer(8, split=3), ActQuantizer(8)
    for q in (split, joint):
        q.mode = "observe"
        q(x)
        q.calibrate()
    assert split.scale[0] < split.scale[1] / 100
    err = lambda q: (q(x)[:, :3] - h).abs().mean()  # noqa: E731
    assert err(split) < err(joint) / 10


def test_straight_through_gradient():
    q = ActQuantizer(8)
    q.scale[0], q.zero[0] = 0.1, 128
    x = torch.tensor([0.0, 1.0, 100.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped values get no gradient


@pytest.fixture(scope="module")
def unet():
    return quantize_model(tiny_components(seed=0)["unet"], "int8")


def test_calibrated_w8a8_unet_stays_close_to_w8a16(unet):
    g = torch.Generator().manual_seed(0)
    inputs = [{"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor(t),
               "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)} for t in (50, 500, 950)]
    with torch.no_grad():
        ref = unet(**inputs[1]).sample
    info = calibrate_activations(unet, inputs, bits=8)
    assert info["calls"] == 3 and info["quantizers"] == len(act_quantizers(unet))
    assert unet.up_blocks[0].resnets[0].conv_shortcut.act_quant.split == shortcut_splits(unet)[
        "up_blocks.0.resnets.0.conv_shortcut"] == 64
    assert isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor, QuantAttnProcessor)
    with torch.no_grad():
        y = unet(**inputs[1]).sample
        set_activation_quant(unet, False)
        y_off = unet(**inputs[1]).sample
        set_activation_quant(unet, True)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1
    torch.testing.assert_close(y_off, ref, rtol=1e-4, atol=1e-4)  # processor with quantizers off == SDPA


def test_bad_activation_width():
    with pytest.raises(ValueError, match="--acts 1: activation width must be 2..16 bits"):
        calibrate_activations(quantize_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), "int8"), [], bits=1)
