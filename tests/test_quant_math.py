"""Quantizer math on toy tensors: packing, RTN error bounds, group-size rule."""
import pytest
import torch

from quantdream.quant.packing import pack, unpack
from quantdream.quant.rtn import dequantize, quantize_affine, quantize_symmetric, resolve_group_size


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a busy 2-core machine are much faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 33, 128])
def test_packing_round_trips_exactly(bits, n):
    g = torch.Generator().manual_seed(n * bits)
    q = torch.randint(0, 2 ** bits, (5, n), generator=g, dtype=torch.uint8)
    p = pack(q, bits)
    assert p.shape == (5, -(-n * bits // 8))
    assert torch.equal(unpack(p, bits, n), q)


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="cannot pack 3-bit"):
        pack(torch.zeros(2, 2, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="expects uint8"):
        pack(torch.zeros(2, 2, dtype=torch.int8), 4)


def test_int8_is_quantos_symmetric_rtn():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    w_q, s = quantize_symmetric(w, 8)
    assert w_q.dtype == torch.int8
    torch.testing.assert_close(s[:, 0], w.abs().amax(1) / 127)  # s = max|W| / 127
    assert torch.equal(w_q, torch.round(w / s).clamp(-128, 127).to(torch.int8))
    err = (dequantize(w_q, s) - w).abs()
    assert (err <= s / 2 * (1 + 1e-5)).all()  # half a step per channel


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 0), (2, 32), (4, 128)])
def test_affine_error_is_at_most_half_a_step_per_group(bits, group):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 3, 8)[:, None]
    w_q, s, z = quantize_affine(w, bits, group)
    assert int(w_q.max()) <= 2 ** bits - 1
    gs = resolve_group_size(96, group)
    assert s.shape == (8, 96 // gs)
    err = (dequantize(w_q, s, z) - w).abs().reshape(8, -1, gs)
    assert (err <= s[..., None] / 2 * (1 + 1e-4) + 1e-7).all()


def test_zero_channel_dequantizes_to_zero():
    w = torch.zeros(3, 64)
    for q in (quantize_symmetric(w), quantize_affine(w, 4, 32)):
        assert torch.equal(dequantize(*q), w)


def test_group_size_rule_matches_quanto():
    assert resolve_group_size(2880, 128) == 96       # 320*3*3: lowered in steps of 32
    assert resolve_group_size(1280, 128) == 128
    assert resolve_group_size(100, 128) == 100       # n <= group: per channel
    assert resolve_group_size(27 * 7, 128) == 27 * 7  # nothing >= 32 divides: per channel
    assert resolve_group_size(4096, 0) == 4096       # 0 = per output channel


def test_unsupported_bits_error():
    with pytest.raises(ValueError, match="3-bit weights are not supported"):
        quantize_symmetric(torch.randn(2, 2), 3)
