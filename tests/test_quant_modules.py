"""QLinear / QConv2d against float layers, scale training, timestep experts, quantize_model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantdream.quant.modules as qmod
from quantdream.quant import (QConv2d, QLinear, enable_scale_training, quantize_model, quantized_layers,
                              scale_parameters)

WEIGHTS = [(8, 128), (4, 32), (4, 0), (2, 32)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a busy 2-core machine are much faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _float_twin(q):
    """A float layer holding the dequantized weight."""
    if isinstance(q, QLinear):
        return lambda x: F.linear(x, q.dequantize(), q.bias)
    return lambda x: F.conv2d(q._prepare_input(x), q.dequantize(), q.bias, q.stride, q._conv_padding(),
                              q.dilation, q.groups)


@pytest.mark.parametrize("bits,group", WEIGHTS)
def test_qlinear_matches_float_layer_with_dequantized_weight(bits, group):
    torch.manual_seed(0)
    q = QLinear.from_module(nn.Linear(64, 24), bits, group)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y, y_ref = q(x), _float_twin(q)(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


@pytest.mark.parametrize("bits,group", WEIGHTS)
@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=0, groups=2),
                                dict(stride=1, padding=2, dilation=2, padding_mode="reflect"),
                                dict(stride=1, padding="same")])
def test_qconv2d_matches_float_layer_with_dequantized_weight(bits, group, kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, **kw)
    q = QConv2d.from_module(conv, bits, group)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    y, y_ref = q(x), _float_twin(q)(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    # and it is close to the float conv it came from
    assert (y - conv(x)).abs().max() < {8: 0.02, 4: 0.3, 2: 1.5}[bits]


def test_row_chunking_does_not_change_results(monkeypatch):
    torch.manual_seed(2)
    lin, conv = QLinear.from_module(nn.Linear(32, 40), 4, 32), QConv2d.from_module(nn.Conv2d(4, 10, 3), 8)
    x1, x2 = torch.randn(6, 32), torch.randn(1, 4, 6, 6)
    whole = lin(x1), conv(x2)
    monkeypatch.setattr(qmod, "CHUNK_ELEMENTS", 100)
    assert len(lin._row_chunks()) > 1
    torch.testing.assert_close(lin(x1), whole[0])
    torch.testing.assert_close(conv(x2), whole[1])
    monkeypatch.undo()
    lin.chunk_elements = 64                      # per layer, as memory.low_memory_unet sets it
    assert len(lin._row_chunks()) == 40 * 32 // 64 and len(conv._row_chunks()) == 1
    torch.testing.assert_close(lin(x1), whole[0])


def _toy():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 6))


@pytest.mark.parametrize("mode", ["out", "out_in"])
def test_only_scales_get_gradients_and_change(mode):
    model = quantize_model(_toy(), "int4", group_size=32)
    enable_scale_training(model, mode)
    trainable = {id(p) for p in scale_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(scale_parameters(model), lr=1e-2)
    x = torch.randn(4, 3, 5, 5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        assert moved == (".s_out." in k or ".s_in." in k), k


@pytest.mark.parametrize("bits,group", WEIGHTS)
def test_scale_gradients_match_autograd_through_dequantize(bits, group):
    torch.manual_seed(4)
    q = QConv2d.from_module(nn.Conv2d(6, 5, 3, padding=1), bits, group)
    enable_scale_training(nn.Sequential(q), "out_in")
    with torch.no_grad():
        q.s_in[0].uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 7, 7)
    g = torch.randn(2, 5, 7, 7)
    params = [q.s_out[0], q.s_in[0]]
    got = torch.autograd.grad((q(x) * g).sum(), params)
    ref = torch.autograd.grad((_float_twin(q)(x) * g).sum(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits,group", WEIGHTS)
def test_tuneqdm_with_unit_s_in_reproduces_frozen_layer_exactly(bits, group):
    model = quantize_model(_toy(), f"int{bits}", group_size=group)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        frozen = model(x)
    enable_scale_training(model, "out_in", num_experts=3, hook=False)
    for _, layer in quantized_layers(model):
        assert torch.equal(layer.s_out[0], layer.scale) and torch.equal(layer.s_in[0], torch.ones_like(layer.s_in[0]))
    assert torch.equal(model(x), frozen)


class _TimeNet(nn.Module):
    """A module called like a UNet: forward(sample, timestep)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, sample, timestep):
        return self.lin(sample)


def test_timestep_selects_expert_and_only_that_expert_learns():
    model = quantize_model(_TimeNet(), "int8")
    sel = enable_scale_training(model, "out", num_experts=4)
    layer = model.lin
    with torch.no_grad():
        for j in range(4):
            layer.s_out[j].mul_(j + 1)
    x = torch.randn(1, 4)
    outs = {}
    for t, j in [(0, 0), (249, 0), (250, 1), (999, 3), (torch.tensor([600]), 2)]:
        outs[j] = model(x, timestep=t) - layer.bias
        assert sel.current == j
    torch.testing.assert_close(outs[1], 2 * outs[0])
    torch.testing.assert_close(outs[3], 4 * outs[0])
    model(x, torch.tensor(700)).sum().backward()  # positional timestep, expert 2
    assert [p.grad is not None for p in layer.s_out] == [False, False, True, False]
    with pytest.raises(ValueError, match="mixes timesteps"):
        model(torch.randn(2, 4), torch.tensor([10, 900]))
    with pytest.raises(ValueError, match="without a timestep"):
        model.lin.register_forward_hook(lambda *a: None)  # unrelated hook is harmless
        model(x, None)


def test_s1_interval_uses_frozen_scales_outside():
    model = quantize_model(_TimeNet(), "int8")
    sel = enable_scale_training(model, "out", interval=(500, 900))
    with torch.no_grad():
        model.lin.s_out[0].mul_(2)
    x = torch.randn(1, 4)
    inside, outside = model(x, 600), model(x, 100)
    assert sel.current is None
    with torch.no_grad():
        frozen = F.linear(x, model.lin.scale * model.lin.qweight.float(), model.lin.bias)
    torch.testing.assert_close(outside, frozen)
    assert not torch.allclose(inside, frozen)


def test_quantize_model_swaps_linear_and_conv_only():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2))
    quantize_model(model, "int8", skip=lambda name, m: name == "3")
    assert [type(m).__name__ for m in model] == ["Embedding", "LayerNorm", "QLinear", "Linear"]
    assert quantize_model(nn.Sequential(nn.Linear(2, 2)), "none")[0].__class__ is nn.Linear


def test_shared_module_stays_shared():
    lin = nn.Linear(4, 4)
    model = quantize_model(nn.ModuleDict({"a": lin, "b": lin}), "int8")
    assert model["a"] is model["b"] and isinstance(model["a"], QLinear)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="weights='int3' is not supported; choose one of none, int8, int4, int2"):
        quantize_model(_toy(), "int3")
    with pytest.raises(ValueError, match="group_size must be a non-negative integer"):
        quantize_model(_toy(), "int4", group_size=-32)
    with pytest.raises(ValueError, match="for a lone Linear use QLinear.from_module"):
        quantize_model(nn.Linear(2, 2), "int8")
    with pytest.raises(ValueError, match="has no quantized layers"):
        enable_scale_training(_toy(), "out")
    model = quantize_model(_toy(), "int8")
    with pytest.raises(ValueError, match="mode='both' is not a scale-training mode"):
        enable_scale_training(model, "both")
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        enable_scale_training(model, "out", num_experts=0)
    with pytest.raises(ValueError, match="one trainable scale set"):
        enable_scale_training(model, "out", num_experts=2, interval=(0, 500))
    enable_scale_training(model, "out")
    with pytest.raises(ValueError, match="already enabled"):
        enable_scale_training(model, "out")


def test_no_grad_forward_and_bf16_compute():
    model = quantize_model(_toy(), "int8")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = model(x)
        y16 = model.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y, rtol=0.05, atol=0.05)


def test_casting_the_model_keeps_scales_float32():
    model = quantize_model(_toy(), "int4", group_size=32)
    enable_scale_training(model, "out_in")
    model.to(torch.bfloat16)
    for _, layer in quantized_layers(model):
        assert layer.scale.dtype == layer.zero.dtype == layer.s_out[0].dtype == layer.s_in[0].dtype == torch.float32
        assert layer.bias.dtype == torch.bfloat16
    model(torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in scale_parameters(model))
