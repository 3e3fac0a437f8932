"""Round-to-nearest weight quantizers: pure functions of a 2-D weight ``W: (m, n)``.

Rows are output channels; ``n`` is the flattened input (``in_features``, or
``in_channels/groups * kh * kw`` for a convolution).

* Symmetric (quanto's ``qint8``, as ZOODiP used it; Z-paper Eq. 2 with zero-point 0)::

      s_o = max_i |W[o, i]| / (2^(b-1) - 1)
      W_q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1),      W_hat = s * W_q

* Asymmetric group-wise (quanto's ``qint4``; PEQA's form with a float zero-point)::

      s_og = (max_g W - min_g W) / (2^b - 1),   z_og = -min_g W / s_og
      W_q = clamp(round(W / s + z), 0, 2^b - 1),                W_hat = s * (W_q - z)

  over groups ``g`` of ``group_size`` consecutive inputs of a row.

Both keep ``|W - W_hat| <= s / 2`` for every element (a half step of its own channel or group).
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit weights are not supported; choose one of "
                         f"{', '.join(f'int{b}' for b in SUPPORTED_BITS)}")
    return bits


def resolve_group_size(n: int, group_size: int | None) -> int:
    """Group length along a row of ``n`` inputs (quanto's rule).

    Start at ``group_size`` and lower it in steps of 32 (not below 32) until it divides ``n``;
    when ``n <= group_size``, when nothing divides, or when ``group_size`` is None/0, a group is the
    whole row (per-output-channel quantization).
    """
    if not group_size or n <= group_size:
        return n
    if group_size < 0:
        raise ValueError(f"group_size must be positive (or 0 for per-channel), got {group_size}")
    g = group_size
    while g >= 32:
        if n % g == 0:
            return g
        g -= 32
    return n


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # an all-zero channel (or group) gets step 1 and codes 0, so it dequantizes to exactly 0
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_symmetric(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric RTN. ``w: (m, n)`` -> ``(W_q int8 (m, n), s float32 (m, 1))``."""
    check_bits(bits)
    w = w.detach().float()
    q_max = 2 ** (bits - 1) - 1
    s = _safe(w.abs().amax(dim=1, keepdim=True) / q_max)  # (m, 1)
    w_q = torch.clamp(torch.round(w / s), -q_max - 1, q_max).to(torch.int8)
    return w_q, s


def quantize_affine(w: torch.Tensor, bits: int = 4, group_size: int | None = 128
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric RTN. ``w: (m, n)`` -> ``(W_q uint8 (m, n), s (m, G), z (m, G))``, G = n / group."""
    check_bits(bits)
    w = w.detach().float()
    m, n = w.shape
    g = resolve_group_size(n, group_size)
    wg = w.reshape(m, n // g, g)
    w_min, w_max = wg.amin(dim=2), wg.amax(dim=2)            # (m, G)
    s = _safe((w_max - w_min) / (2 ** bits - 1))
    z = -w_min / s
    w_q = torch.clamp(torch.round(wg / s[..., None] + z[..., None]), 0, 2 ** bits - 1)
    return w_q.reshape(m, n).to(torch.uint8), s, z


def dequantize(w_q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """Reference ``W_hat = s * (W_q - z)`` with ``s, z: (m, G)`` broadcast over groups of a row."""
    m, n = w_q.shape
    G = s.shape[1]
    c = w_q.float().reshape(m, G, n // G)
    if z is not None:
        c = c - z[..., None]
    return (c * s[..., None]).reshape(m, n)
