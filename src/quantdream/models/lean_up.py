"""Up blocks that never build the skip concatenation (part of the low-memory mode; no-grad forwards only).

diffusers' up blocks run ``resnet(torch.cat([h, skip], 1), temb)``. At SD-1.5's last block and 512 px the
960-channel concatenation and its GroupNorm+SiLU output (15.7 MiB each) are resident together while conv1
runs, and that sets the resident peak of a ZOODiP step. Here the resnet reads ``h`` and ``skip`` where they
are, one block of input channels at a time:

    GroupNorm([h, skip])      per-group mean and variance from the parts' per-channel moments
    conv1(silu(gn(x)))      = sum_b conv1[:, b](silu(gn(x)[b]))       over input-channel blocks b
    shortcut(x)             = sum_b shortcut[:, b](x[b])              (1x1 conv, linear in its input)

so nothing wider than one block (<= 1M elements) is built, and each skip is freed once read. Hand-written
because diffusers' blocks take one tensor and no library splits a conv over its input channels. Same outputs
up to float rounding (tests/test_quantized_folder.py). Blocks or layers it does not cover (FreeU, upsampling
resnets, LoRA-wrapped or activation-quantized convs, autograd) run diffusers' own forward.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from ..quant.modules import QConv2d

BLOCK_ELEMENTS = 1 << 20   # input-channel block size, in elements (4 MiB in fp32)


def _plain_conv(conv) -> bool:
    if isinstance(conv, QConv2d):
        return conv.groups == 1 and conv.act_quant is None and conv.padding_mode == "zeros"
    return type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"


def covered(resnet) -> bool:
    """Whether :func:`resnet_on_parts` computes this diffusers ``ResnetBlock2D`` without the concatenation."""
    return (getattr(resnet, "upsample", 1) is None and getattr(resnet, "downsample", 1) is None
            and getattr(resnet, "time_embedding_norm", None) == "default"
            and isinstance(resnet.norm1, nn.GroupNorm) and resnet.conv_shortcut is not None
            and _plain_conv(resnet.conv1) and _plain_conv(resnet.conv_shortcut))


def _conv_add_(out: torch.Tensor, conv, x: torch.Tensor, lo: int, hi: int) -> None:
    """``out += conv`` restricted to input channels ``[lo, hi)`` applied to ``x`` (no bias)."""
    if isinstance(conv, QConv2d):
        conv.add_input_slice_(out, x, lo, hi)
    else:
        out += F.conv2d(x, conv.weight[:, lo:hi].to(x.dtype), None, conv.stride, conv.padding, conv.dilation)


def _add_bias_(out: torch.Tensor, conv) -> None:
    if conv.bias is not None:
        out += conv.bias.to(out.dtype).view(1, -1, 1, 1)


def _blocks(parts):
    """(lo, tensor) for consecutive input-channel blocks of the virtual concatenation of ``parts``."""
    lo = 0
    for p in parts:
        b, c, h, w = p.shape
        step = max(1, BLOCK_ELEMENTS // (b * h * w))
        for blk in p.split(step, dim=1):
            yield lo, blk
            lo += blk.shape[1]


def _group_norm_affine(norm: nn.GroupNorm, parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) ``a, b`` with ``GroupNorm(cat(parts)) = cat(parts) * a + b``."""
    var, mean = zip(*(torch.var_mean(p.float(), dim=(2, 3), unbiased=False) for p in parts))   # fp32 stats
    var, mean = torch.cat(var, 1), torch.cat(mean, 1)                       # (B, C)
    b, c = mean.shape
    g = norm.num_groups
    mean_g = mean.view(b, g, -1).mean(-1)
    var_g = (var + mean * mean).view(b, g, -1).mean(-1) - mean_g * mean_g   # E[x^2] - E[x]^2 per group
    rstd = (var_g.clamp_min(0) + norm.eps).rsqrt().repeat_interleave(c // g, 1)
    mean_c = mean_g.repeat_interleave(c // g, 1)
    a = rstd if norm.weight is None else rstd * norm.weight.float()
    shift = -mean_c * a if norm.bias is None else norm.bias.float() - mean_c * a
    dtype = parts[0].dtype
    return a.to(dtype)[:, :, None, None], shift.to(dtype)[:, :, None, None]


def resnet_on_parts(resnet, parts: tuple[torch.Tensor, ...], temb: torch.Tensor | None) -> torch.Tensor:
    """``resnet(torch.cat(parts, 1), temb)`` without building the concatenation (see the module docstring)."""
    first = parts[0]
    out_shape = (first.shape[0], resnet.conv1.out_channels, *first.shape[2:])
    a, shift = _group_norm_affine(resnet.norm1, parts)
    h = first.new_zeros(out_shape)
    sc = first.new_zeros((first.shape[0], resnet.conv_shortcut.out_channels, *first.shape[2:]))
    for lo, blk in _blocks(parts):
        hi = lo + blk.shape[1]
        _conv_add_(sc, resnet.conv_shortcut, blk, lo, hi)
        x = resnet.nonlinearity(torch.addcmul(shift[:, lo:hi], blk, a[:, lo:hi]))
        _conv_add_(h, resnet.conv1, x, lo, hi)
        del x
    _add_bias_(h, resnet.conv1)
    _add_bias_(sc, resnet.conv_shortcut)
    if resnet.time_emb_proj is not None and temb is not None:
        t = temb if resnet.skip_time_act else resnet.nonlinearity(temb)
        h += resnet.time_emb_proj(t)[:, :, None, None]
    h = resnet.conv2(resnet.dropout(resnet.nonlinearity(resnet.norm2(h))))
    return (sc + h) / resnet.output_scale_factor


def _freeu(block) -> bool:
    return bool(getattr(block, "s1", None) and getattr(block, "s2", None) and getattr(block, "b1", None)
                and getattr(block, "b2", None))


def _release(skip: torch.Tensor) -> None:
    """Free a consumed skip now, not when the up block returns: ``UNet2DConditionModel.forward`` still
    holds the tuple of skips but never reads it again. Only a tensor that owns its whole storage."""
    st = skip.untyped_storage()
    if skip._base is None and skip.storage_offset() == 0 and st.nbytes() == skip.numel() * skip.element_size():
        st.resize_(0)


def _lean_forward(block, stock, signature, *args, **kwargs):
    if torch.is_grad_enabled() or _freeu(block):
        return stock(*args, **kwargs)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    hidden_states, skips, temb = a["hidden_states"], a["res_hidden_states_tuple"], a.get("temb")
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in zip(block.resnets, attentions):
        skip, skips = skips[-1], skips[:-1]
        if covered(resnet):
            hidden_states = resnet_on_parts(resnet, (hidden_states, skip), temb)
        else:
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
        _release(skip)
        del skip
        if attn is not None:
            hidden_states = attn(hidden_states, encoder_hidden_states=a.get("encoder_hidden_states"),
                                 cross_attention_kwargs=a.get("cross_attention_kwargs"),
                                 attention_mask=a.get("attention_mask"),
                                 encoder_attention_mask=a.get("encoder_attention_mask"), return_dict=False)[0]
    for upsampler in block.upsamplers or ():
        hidden_states = upsampler(hidden_states, a.get("upsample_size"))
    return hidden_states


def lean_up_blocks(unet) -> int:
    """Give diffusers' ``UpBlock2D`` / ``CrossAttnUpBlock2D`` instances of ``unet`` the concatenation-free
    forward for no-grad calls (the instance's ``forward`` only: parameter names stay). Returns the number of
    blocks changed; other block types are left as they are."""
    if type(unet).__name__ != "UNet2DConditionModel":   # the caller _release relies on
        return 0
    n = 0
    for block in unet.up_blocks:
        if type(block).__name__ not in ("UpBlock2D", "CrossAttnUpBlock2D") or "forward" in vars(block):
            continue
        stock = type(block).forward.__get__(block)
        block.forward = functools.partial(_lean_forward, block, stock, inspect.signature(stock))
        n += 1
    return n
