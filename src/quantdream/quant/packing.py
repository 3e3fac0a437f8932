"""Sub-byte code packing: ``8 // bits`` codes per byte, first code in the low bits.

``pack(W_q (m, n) uint8, bits) -> (m, ceil(n * bits / 8)) uint8`` and ``unpack`` inverts it exactly
(rows are padded with zeros to a whole byte; ``unpack`` drops the padding).
"""
from __future__ import annotations

import torch


def _per_byte(bits: int) -> int:
    if bits not in (1, 2, 4):
        raise ValueError(f"cannot pack {bits}-bit codes; packing supports 1, 2 and 4 bits")
    return 8 // bits


def packed_cols(n: int, bits: int) -> int:
    k = _per_byte(bits)
    return (n + k - 1) // k


def pack(w_q: torch.Tensor, bits: int) -> torch.Tensor:
    k = _per_byte(bits)
    if w_q.dtype != torch.uint8:
        raise ValueError(f"pack expects uint8 codes, got {w_q.dtype}")
    m, n = w_q.shape
    pad = packed_cols(n, bits) * k - n
    if pad:
        w_q = torch.nn.functional.pad(w_q, (0, pad))
    w_q = w_q.reshape(m, -1, k)
    out = w_q[..., 0].clone()
    for j in range(1, k):
        out |= w_q[..., j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    k = _per_byte(bits)
    mask = (1 << bits) - 1
    m = packed.shape[0]
    out = torch.empty(m, packed.shape[1], k, dtype=torch.uint8, device=packed.device)
    for j in range(k):
        torch.bitwise_and(packed >> (bits * j), mask, out=out[..., j])
    return out.reshape(m, -1)[:, :n]
