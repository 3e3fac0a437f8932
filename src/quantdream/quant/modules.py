"""Quantized ``Linear`` and ``Conv2d``: integer codes + scales, dequantized one layer at a time.

A layer with weight ``W: (m, n_in, *k)`` (``m`` outputs, ``n_in`` inputs per group, kernel ``k``)
computes its op with (TuneQDM's MCSU form, methods.md §2.3)::

    W = diag(s_out) (W_q - z) diag(s_in)

* frozen (the default): ``s_out`` is the quantizer's scale, ``s_in`` absent (= 1), ``z`` the
  zero-point (absent for symmetric int8);
* scale training (:func:`quantdream.quant.enable_scale_training`): ``s_out`` (PEQA) and optionally
  ``s_in`` become ``nn.Parameter`` s, one set per timestep expert (TuneQDM TAS).

The float weight never exists as a whole: ``W`` is rebuilt per layer, in row chunks of at most
:data:`CHUNK_ELEMENTS`, right before its matmul/convolution and dropped after. Backward goes
through :class:`_QuantizedOp`, which saves only the (integer) codes and the scales and rebuilds
the chunk again, so autograd never stores a dequantized weight either.

Integer kernels were measured against this (``benchmarks/quantization.py``, ``kernels``): on this
CPU ``torch._weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` lose to dequantize + GEMM
at the token counts of a UNet, and there is no integer Conv2d, so every layer dequantizes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .packing import pack, packed_cols, unpack
from .rtn import check_bits, quantize_affine, quantize_symmetric, resolve_group_size

CHUNK_ELEMENTS = 1 << 23  # weight elements rebuilt at once: 32 MiB in fp32


class QuantizedLayer(nn.Module):
    """Shared base of :class:`QLinear` and :class:`QConv2d` (codes, scales, forward, backward).

    Buffers: ``qweight`` (int8 ``(m, n)`` for 8 bits; packed uint8 ``(m, ceil(n*bits/8))`` below),
    ``scale`` ``(m, G)`` and ``zero`` ``(m, G)`` (asymmetric only), ``n = n_in * prod(k)``, ``G`` groups
    per row. ``bias`` stays float. ``act_quant`` is an optional input quantizer (activations.py).
    """

    _channel_dim = -1

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, bits: int, group_size: int | None,
                 device=None):
        super().__init__()
        check_bits(bits)
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.bits = bits
        self.symmetric = bits == 8  # int8: quanto's symmetric qint8; below: asymmetric group-wise
        m, n = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self.group_size = n if self.symmetric else resolve_group_size(n, group_size)
        G = n // self.group_size
        if self.symmetric:
            self.register_buffer("qweight", torch.empty(m, n, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.empty(m, packed_cols(n, bits), dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("scale", torch.empty(m, G, dtype=torch.float32, device=device))
        self.register_buffer("zero", None if self.symmetric else
                             torch.empty(m, G, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(m, device=device)) if bias else None
        self.act_quant: nn.Module | None = None
        self.s_out: nn.ParameterList | None = None
        self.s_in: nn.ParameterList | None = None
        self._selector = None  # a timestep.ScaleSelector shared by every layer of a model

    # -- construction ------------------------------------------------------------------------
    def _set_codes(self, w: torch.Tensor) -> None:
        w2d = w.detach().reshape(w.shape[0], -1)
        if self.symmetric:
            w_q, s = quantize_symmetric(w2d, self.bits)
            self.qweight.copy_(w_q)
        else:
            w_q, s, z = quantize_affine(w2d, self.bits, self.group_size)
            self.qweight.copy_(pack(w_q, self.bits))
            self.zero.copy_(z)
        self.scale.copy_(s)

    def _take_bias(self, module: nn.Module) -> None:
        if module.bias is not None:  # shares the float bias's storage: no copy
            self.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` move scales and zero-points but keep them float32 (a bf16
        model computes in bf16; its quantizer metadata and trainable scales stay exact)."""
        keep = {k: self._buffers[k] for k in ("scale", "zero") if self._buffers.get(k) is not None}
        lists = {k: self._modules.pop(k) for k in ("s_out", "s_in") if self._modules.get(k) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules.update(lists)
        device = self.qweight.device
        for k, old in keep.items():
            self._buffers[k] = old.to(device)
        for plist in lists.values():
            for p in plist:
                if p.device != device:
                    p.data = p.data.to(device)
        return self

    # -- the weight ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return math.prod(self.weight_shape[1:])

    def _row_chunks(self) -> list[slice]:
        m = self.weight_shape[0]
        chunk = getattr(self, "chunk_elements", CHUNK_ELEMENTS)   # per layer (memory.low_memory_unet)
        rows = m if getattr(self, "groups", 1) != 1 else max(1, chunk // self.n)
        return [slice(i, min(i + rows, m)) for i in range(0, m, rows)]

    def _centered(self, rows: slice) -> torch.Tensor:
        """``W_q - z`` for the given output rows, float32 ``(r, n)`` (a fresh tensor)."""
        if self.symmetric:
            return self.qweight[rows].float()
        c = unpack(self.qweight[rows], self.bits, self.n).float()
        r = c.shape[0]
        c.view(r, -1, self.group_size).sub_(self.zero[rows].unsqueeze(-1))
        return c

    def _weight(self, rows: slice, s_out: torch.Tensor, s_in: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """diag(s_out) (W_q - z) diag(s_in) for ``rows``, shaped like the float weight, in ``dtype``."""
        with torch.no_grad():
            c = self._centered(rows)
            r = c.shape[0]
            c.view(r, -1, self.group_size).mul_(s_out[rows].unsqueeze(-1))
            if s_in is not None:
                c.view(r, self.weight_shape[1], -1).mul_(s_in.view(1, -1, 1))
            return c.view(r, *self.weight_shape[1:]).to(dtype)

    def current_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s_out, s_in) used by the next forward: the trainable set picked by the timestep
        selector, or the frozen quantizer scale (and no s_in)."""
        if self.s_out is None:
            return self.scale, None
        j = self._selector.current if self._selector is not None else 0
        if j is None:
            return self.scale, None
        return self.s_out[j], (self.s_in[j] if self.s_in is not None else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole float weight of this one layer (differentiable w.r.t. trainable scales)."""
        s_out, s_in = self.current_scales()
        m, n = self.weight_shape[0], self.n
        c = self._centered(slice(None))
        w = (c.view(m, -1, self.group_size) * s_out.unsqueeze(-1)).view(m, n)
        if s_in is not None:
            w = (w.view(m, self.weight_shape[1], -1) * s_in.view(1, -1, 1)).view(m, n)
        return w.view(self.weight_shape).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, built on each access (for code that reads ``.weight``)."""
        return self.dequantize()

    # -- compute --------------------------------------------------------------------------------
    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _op(self, x, w, b):  # pragma: no cover - abstract
        raise NotImplementedError

    def _out_slice(self, y: torch.Tensor, rows: slice) -> torch.Tensor:
        return y[..., rows]

    def _grad_input(self, gy: torch.Tensor, w: torch.Tensor, x_shape) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def _grad_weight(self, x: torch.Tensor, gy: torch.Tensor, w_shape) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def _forward_chunks(self, x, s_out, s_in, b) -> torch.Tensor:
        out = None
        chunks = self._row_chunks()
        for rows in chunks:
            w = self._weight(rows, s_out, s_in, x.dtype)
            y = self._op(x, w, None if b is None else b[rows].to(x.dtype))
            del w
            if len(chunks) == 1:
                return y
            if out is None:   # chunks go straight into the output: no list of parts plus their concatenation
                shape = list(y.shape)
                shape[self._channel_dim] = self.weight_shape[0]
                out = y.new_empty(shape)
            self._out_slice(out, rows).copy_(y)
            del y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        x = self._prepare_input(x)
        s_out, s_in = self.current_scales()
        b = self.bias
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, s_out, s_in, b)):
            return _QuantizedOp.apply(self, x, s_out, s_in, b)
        with torch.no_grad():
            return self._forward_chunks(x, s_out, s_in, b)

    def extra_repr(self) -> str:
        kind = "int8 symmetric per-channel" if self.symmetric else \
            f"int{self.bits} asymmetric group={self.group_size}"
        trained = "" if self.s_out is None else \
            f", trainable scales x{len(self.s_out)}{' +s_in' if self.s_in is not None else ''}"
        return f"{self._shape_repr()}, {kind}, bias={self.bias is not None}{trained}"

    def _shape_repr(self) -> str:
        return str(self.weight_shape)


class _QuantizedOp(torch.autograd.Function):
    """y = op(x, diag(s_out)(W_q - z)diag(s_in)) + b with gradients for x, s_out, s_in and b.

    dL/dx  = op^T(dL/dy, W)                           (W rebuilt per chunk)
    dL/dW  = op_w(x, dL/dy)                           (one chunk at a time)
    dL/ds_out[o, g] = sum_{i in g} dL/dW[o, i] (W_q - z)[o, i] s_in[i]
    dL/ds_in[i]     = sum_{o, k}   dL/dW[o, i, k] s_out[o, g] (W_q - z)[o, i, k]
    """

    @staticmethod
    def forward(ctx, layer, x, s_out, s_in, b):
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.b_dtype = None if b is None else b.dtype
        need_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x if need_w else None, s_out, s_in)
        return layer._forward_chunks(x, s_out, s_in, b)

    @staticmethod
    def backward(ctx, gy):
        layer: QuantizedLayer = ctx.layer
        x, s_out, s_in = ctx.saved_tensors
        want_x, want_so, want_si, want_b = ctx.needs_input_grad[1:5]
        gx = g_so = g_si = gb = None
        if want_so:
            g_so = torch.zeros_like(s_out)
        if want_si:
            g_si = torch.zeros_like(s_in)
        n_in, gs = layer.weight_shape[1], layer.group_size
        for rows in layer._row_chunks():
            gy_r = layer._out_slice(gy, rows)
            if want_x:
                w = layer._weight(rows, s_out, s_in, gy.dtype)
                gx_r = layer._grad_input(gy_r, w, ctx.x_shape)
                gx = gx_r if gx is None else gx.add_(gx_r)
                del w
            if want_so or want_si:
                c = layer._centered(rows)
                r = c.shape[0]
                w_shape = (r, *layer.weight_shape[1:])
                gw = layer._grad_weight(x, gy_r, w_shape).float().reshape(r, -1)
                gwc = gw.mul_(c)  # dL/dW * (W_q - z)
                del c
                if want_so:
                    t = gwc if s_in is None else (gwc.view(r, n_in, -1) * s_in.view(1, -1, 1)).view(r, -1)
                    g_so[rows] = t.view(r, -1, gs).sum(-1).to(g_so.dtype)
                if want_si:
                    t = gwc.view(r, -1, gs) * s_out[rows].unsqueeze(-1)
                    g_si += t.view(r, n_in, -1).sum(dim=(0, 2)).to(g_si.dtype)
        if want_b:
            ch = layer._channel_dim % gy.dim()
            dims = [d for d in range(gy.dim()) if d != ch]
            gb = gy.sum(dim=dims).to(ctx.b_dtype)
        return None, gx, g_so, g_si, gb


class QLinear(QuantizedLayer):
    """Quantized ``nn.Linear``: ``y = x W^T + b``."""

    _channel_dim = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: int | None = 128, device=None):
        super().__init__((out_features, in_features), bias, bits, group_size, device)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_module(cls, module: nn.Linear, bits: int = 8, group_size: int | None = 128,
                    quantize: bool = True) -> "QLinear":
        """Quantize ``module`` (or, with ``quantize=False``, make an empty twin on its device)."""
        q = cls(module.in_features, module.out_features, module.bias is not None, bits, group_size,
                device=module.weight.device)
        if quantize:
            q._set_codes(module.weight)
            q._take_bias(module)
        return q

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _grad_input(self, gy, w, x_shape):
        return gy.matmul(w)

    def _grad_weight(self, x, gy, w_shape):
        return gy.reshape(-1, gy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(gy.dtype))

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _int_padding(padding, kernel_size, dilation) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"Conv2d padding='same' with kernel {tuple(kernel_size)} needs uneven padding, "
                             "which QConv2d does not support; use explicit integer padding")
        return tuple(t // 2 for t in total)
    return tuple(padding)


class QConv2d(QuantizedLayer):
    """Quantized ``nn.Conv2d`` (any stride, padding, dilation, groups, padding_mode)."""

    _channel_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", bits: int = 8,
                 group_size: int | None = 128, device=None):
        pair = torch.nn.modules.utils._pair
        kernel_size, stride, dilation = pair(kernel_size), pair(stride), pair(dilation)
        padding = padding if isinstance(padding, str) else pair(padding)
        super().__init__((out_channels, in_channels // groups, *kernel_size), bias, bits, group_size, device)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding = _int_padding(padding, kernel_size, dilation)
        self.padding_mode = padding_mode

    @classmethod
    def from_module(cls, module: nn.Conv2d, bits: int = 8, group_size: int | None = 128,
                    quantize: bool = True) -> "QConv2d":
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode, bits,
                group_size, device=module.weight.device)
        if quantize:
            q._set_codes(module.weight)
            q._take_bias(module)
        return q

    def _prepare_input(self, x):
        if self.padding_mode == "zeros":
            return x
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)

    def _conv_padding(self):
        return self.padding if self.padding_mode == "zeros" else (0, 0)

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self._conv_padding(), self.dilation, self.groups)

    def _out_slice(self, y, rows):
        return y[:, rows]

    def add_input_slice_(self, out: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> None:
        """``out += conv(x)`` with the weight's input channels ``[lo, hi)`` only (``x`` holds those channels;
        no bias, no autograd): one term of a convolution split over its input channels (models/lean_up.py)."""
        s_out, s_in = self.current_scales()
        with torch.no_grad():
            for rows in self._row_chunks():
                out[:, rows] += self._op(x, self._weight(rows, s_out, s_in, x.dtype)[:, lo:hi], None)

    def _grad_input(self, gy, w, x_shape):
        return torch.nn.grad.conv2d_input(x_shape, w, gy, self.stride, self._conv_padding(), self.dilation,
                                          self.groups)

    def _grad_weight(self, x, gy, w_shape):
        return torch.nn.grad.conv2d_weight(x.to(gy.dtype), w_shape, gy, self.stride, self._conv_padding(),
                                           self.dilation, self.groups)

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")
