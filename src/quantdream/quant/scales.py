"""Trainable quantization scales: PEQA (``s_out``), TuneQDM MCSU (``s_out``, ``s_in``) and TAS experts.

PEQA (methods.md §4.1): ``W = s (W_q - z)`` with only ``s`` trained, initialized to the quantizer scale.
TuneQDM (§2.3): ``W = diag(s_out)(W_q - z)diag(s_in)``, ``s_in`` initialized to 1, N copies of the
scales picked by timestep (timestep.py). Everything else in the model is frozen.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .apply import quantized_layers
from .timestep import ScaleSelector

SCALE_MODES = ("out", "out_in")
SCALES_FORMAT = "quantdream-scales"
SCALES_FORMAT_VERSION = 2     # 2: float16 files hold changes from the initial scales ("encoding": "delta")
SCALE_DTYPES = {"float16": "delta", "float32": "absolute"}   # save_scales' dtype -> what the file holds


def _layers_or_fail(model: nn.Module) -> list:
    layers = list(quantized_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layers; run quantize_model(model, 'int8') "
                         "(or load a quantized folder) before enabling scale training")
    return layers


def enable_scale_training(model: nn.Module, mode: str = "out", num_experts: int = 1, *,
                          interval: tuple[float, float] | None = None, num_train_timesteps: int = 1000,
                          hook: bool = True) -> ScaleSelector:
    """Make the scales of every quantized layer trainable and freeze every other parameter.

    mode: ``"out"`` trains ``s_out`` only (PEQA); ``"out_in"`` also ``s_in`` (TuneQDM MCSU).
    num_experts: N scale sets chosen by ``j = min(N-1, floor(t*N/T))`` (TuneQDM TAS; N=1: PEQA).
    interval: ``(t_lo, t_hi)``: one trainable set used only for ``t_lo <= t < t_hi``, frozen
        quantizer scales elsewhere (TuneQDM v1 S1).
    hook: with several sets or an interval, register a forward pre-hook on ``model`` reading its
        ``timestep`` argument (UNet2DConditionModel); pass False to select sets yourself.

    Returns the :class:`ScaleSelector` (``.set_timestep(t)`` / ``.set_expert(j)``).
    """
    if mode not in SCALE_MODES:
        raise ValueError(f"mode={mode!r} is not a scale-training mode; choose 'out' (PEQA) or 'out_in' (TuneQDM)")
    selector = ScaleSelector(num_experts, num_train_timesteps, interval)
    layers = _layers_or_fail(model)
    if any(layer.s_out is not None for _, layer in layers):
        raise ValueError("scale training is already enabled on this model; call disable_scale_training(model) first")
    # -- checks done; mutate --
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in layers:
        layer.s_out = nn.ParameterList(nn.Parameter(layer.scale.detach().clone()) for _ in range(num_experts))
        if mode == "out_in":
            layer.s_in = nn.ParameterList(
                nn.Parameter(torch.ones(layer.weight_shape[1], device=layer.scale.device, dtype=layer.scale.dtype))
                for _ in range(num_experts))
        layer._selector = selector
    if hook and (num_experts > 1 or interval is not None):
        model._quantdream_scale_hook = selector.attach(model)
    model._quantdream_scale_selector = selector
    model._quantdream_scale_mode = mode
    return selector


def disable_scale_training(model: nn.Module, keep_expert: int | None = None) -> None:
    """Drop the trainable scales; with ``keep_expert=j`` first write set j into the frozen scales
    (only ``mode='out'``: an ``s_in`` cannot be folded into per-output scales)."""
    layers = _layers_or_fail(model)
    if keep_expert is not None and any(layer.s_in is not None for _, layer in layers):
        raise ValueError("keep_expert needs mode='out': s_in cannot be folded into the per-output scales")
    for _, layer in layers:
        if layer.s_out is None:
            continue
        if keep_expert is not None:
            with torch.no_grad():
                layer.scale.copy_(layer.s_out[keep_expert])
        layer.s_out = layer.s_in = None
        layer._selector = None
    handle = getattr(model, "_quantdream_scale_hook", None)
    if handle is not None:
        handle.remove()
    for attr in ("_quantdream_scale_hook", "_quantdream_scale_selector", "_quantdream_scale_mode"):
        model.__dict__.pop(attr, None)


def scale_selector(model: nn.Module) -> ScaleSelector | None:
    return getattr(model, "_quantdream_scale_selector", None)


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scales (what to hand the optimizer)."""
    out = []
    for _, layer in quantized_layers(model):
        for plist in (layer.s_out, layer.s_in):
            if plist is not None:
                out.extend(plist)
    return out


def _scale_entries(model: nn.Module):
    """``("<layer>.<kind>.<j>", kind, parameter, layer)`` for every trainable scale set (kind: s_out, s_in)."""
    for name, layer in quantized_layers(model):
        for kind in ("s_out", "s_in"):
            for j, p in enumerate(getattr(layer, kind) or []):
                yield f"{name}.{kind}.{j}", kind, p, layer


def scales_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.s_out.<j>": (m, G), "<layer>.s_in.<j>": (n_in,)}``, detached fp32 copies."""
    return {key: p.detach().float().cpu().contiguous() for key, _, p, _ in _scale_entries(model)}


def _initial_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """What each entry of scales_state_dict starts at: the quantizer's scale (s_out) and 1 (s_in)."""
    return {key: layer.scale.detach().float().cpu() if kind == "s_out" else torch.ones(p.shape)
            for key, kind, p, layer in _scale_entries(model)}


def save_scales(model: nn.Module, path: str | os.PathLike, *, dtype: str = "float16",
                metadata: dict[str, str] | None = None) -> Path:
    """Write only the trained scales (a small safetensors file) with how they were set up; atomic.

    dtype "float32": the scales themselves, exactly. "float16": their changes from the start (s_out - s0,
    s_in - 1), half the size; the load adds them back to the quantizer's scales, so the error is <= 2^-11 of
    the change, not of the scale (an s_in near 1 moves by ~1e-4, below float16's spacing of 1e-3 at 1).
    """
    from ..checkpoint import atomic_write
    selector = scale_selector(model)
    if selector is None:
        raise ValueError("this model has no trainable scales; call enable_scale_training(model, ...) first")
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale file dtype {dtype!r}; choose one of {', '.join(SCALE_DTYPES)}")
    tensors = scales_state_dict(model)
    if dtype == "float16":
        init = _initial_scales(model)
        tensors = {k: (v - init[k]).half().contiguous() for k, v in tensors.items()}
    meta = {"format": SCALES_FORMAT, "format_version": str(SCALES_FORMAT_VERSION),
            "mode": model._quantdream_scale_mode, "num_experts": str(selector.num_experts),
            "num_train_timesteps": str(selector.num_train_timesteps),
            "interval": json.dumps(selector.interval), "encoding": SCALE_DTYPES[dtype], **(metadata or {})}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_scales(model: nn.Module, path: str | os.PathLike, *, hook: bool = True) -> ScaleSelector:
    """Load a scales file written by :func:`save_scales`. Enables scale training with the file's
    settings if it is not on yet. Every check runs before the model is touched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scales file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a safetensors scales file ({e})") from None
    if meta.get("format") != SCALES_FORMAT:
        raise ValueError(f"{path} is not a quantdream scales file (format={meta.get('format')!r})")
    if meta.get("format_version") not in ("1", str(SCALES_FORMAT_VERSION)):
        raise ValueError(f"{path} was written by scales format version {meta.get('format_version')}; this "
                         f"quantdream reads versions 1 to {SCALES_FORMAT_VERSION}")
    delta = meta.get("encoding", "absolute") == "delta"    # version 1 wrote absolute float32 scales
    mode, n = meta["mode"], int(meta["num_experts"])
    interval = json.loads(meta["interval"])
    T = int(meta["num_train_timesteps"])
    layers = dict(_layers_or_fail(model))
    selector = scale_selector(model)
    if selector is not None and (selector.num_experts != n or model._quantdream_scale_mode != mode
                                 or (selector.interval and list(selector.interval)) != (interval and list(interval))):
        raise ValueError(f"{path} holds mode={mode}, num_experts={n}, interval={interval} but the model is set up "
                         f"with mode={model._quantdream_scale_mode}, num_experts={selector.num_experts}, "
                         f"interval={selector.interval}")
    expected = {}
    for name, layer in layers.items():
        for j in range(n):
            expected[f"{name}.s_out.{j}"] = tuple(layer.scale.shape)
            if mode == "out_in":
                expected[f"{name}.s_in.{j}"] = (layer.weight_shape[1],)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not match this model: {len(missing)} scale tensors missing "
                         f"(e.g. {missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]})")
    bad = [k for k, shape in expected.items() if tuple(tensors[k].shape) != shape]
    if bad:
        k = bad[0]
        raise ValueError(f"{path}: {len(bad)} scale tensors have the wrong shape, e.g. {k} is "
                         f"{tuple(tensors[k].shape)}, the model expects {expected[k]}")
    # -- checks done; mutate --
    if selector is None:
        selector = enable_scale_training(model, mode, n, interval=tuple(interval) if interval else None,
                                         num_train_timesteps=T, hook=hook)
    init = _initial_scales(model) if delta else {}
    with torch.no_grad():
        for name, layer in layers.items():
            for j in range(n):
                for kind in ("s_out", "s_in") if mode == "out_in" else ("s_out",):
                    key = f"{name}.{kind}.{j}"
                    value = tensors[key].float() + init[key] if delta else tensors[key]
                    getattr(layer, kind)[j].copy_(value)
    return selector
