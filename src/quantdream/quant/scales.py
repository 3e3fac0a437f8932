"""Trainable quantization scales: PEQA (``s_out``), TuneQDM MCSU (``s_out``, ``s_in``) and TAS experts.

PEQA (methods.md §4.1): ``W = s (W_q - z)`` with only ``s`` trained, initialized to the quantizer scale.
TuneQDM (§2.3): ``W = diag(s_out)(W_q - z)diag(s_in)``, ``s_in`` initialized to 1, N copies of the
scales picked by timestep (timestep.py). Everything else in the model is frozen.
"""
from __future__ import annotations

import json
import math
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
SCALES_FORMAT_VERSION = 3     # 2: changes from the initial scales ("encoding": "delta"); 3: one flat tensor per set
# save_scales' dtype -> what the file holds: int8 changes (one float32 step per layer), float16 changes, float32 scales
SCALE_DTYPES = {"int8": "delta-int8", "float16": "delta", "float32": "absolute"}


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


def _pack(tensors: dict[str, torch.Tensor], layout: list, n: int, kinds: tuple, dtype: str) -> dict[str, torch.Tensor]:
    """One flat tensor per scale set, ``"<kind>.<j>"``, layers in ``layout`` order (one header entry per set
    instead of per layer: the names of ~2,300 tensors cost 270 KB on SD-1.5). int8: ``round(x / step)`` with
    ``step = max|x| / 127`` per layer, kept in ``"<kind>.<j>.step"``."""
    packed = {}
    for kind in kinds:
        for j in range(n):
            parts = [tensors[f"{name}.{kind}.{j}"].reshape(-1) for name, _, _ in layout]
            if dtype == "int8":
                steps = torch.stack([x.abs().max() for x in parts]) / 127
                codes = [torch.round(x / step.clamp_min(torch.finfo(torch.float32).tiny)) for x, step in zip(parts, steps)]
                packed[f"{kind}.{j}"] = torch.cat(codes).to(torch.int8)
                packed[f"{kind}.{j}.step"] = steps
            else:
                packed[f"{kind}.{j}"] = torch.cat(parts).to(getattr(torch, dtype))
    return packed


def _unpack(packed: dict[str, torch.Tensor], layout: list, n: int, kinds: tuple, encoding: str,
            path: Path) -> dict[str, torch.Tensor]:
    """:func:`_pack`'s inverse: ``{"<layer>.<kind>.<j>": float32 tensor}``."""
    out = {}
    for kind in kinds:
        sizes = [math.prod(out_shape) if kind == "s_out" else n_in for _, out_shape, n_in in layout]
        for j in range(n):
            flat, steps = packed.get(f"{kind}.{j}"), packed.get(f"{kind}.{j}.step")
            if flat is None or flat.numel() != sum(sizes) or (encoding == "delta-int8" and (
                    steps is None or steps.numel() != len(layout))):
                raise ValueError(f"{path} is damaged: its {kind} set {j} does not match the layout in its header")
            for (name, out_shape, _), x, step in zip(layout, flat.float().split(sizes), steps if steps is not None
                                                      else [None] * len(layout)):
                out[f"{name}.{kind}.{j}"] = (x * step if step is not None else x).reshape(
                    out_shape if kind == "s_out" else -1)
    return out


def save_scales(model: nn.Module, path: str | os.PathLike, *, dtype: str = "int8",
                metadata: dict[str, str] | None = None) -> Path:
    """Write only the trained scales (a small safetensors file) with how they were set up; atomic.

    dtype "float32": the scales themselves, exactly. "float16" / "int8": their changes from the start
    (s_out - s0, s_in - 1); the load adds them back to the quantizer's scales, so the error is a fraction of
    the change, not of the scale (an s_in near 1 moves by ~1e-4, below float16's spacing of 1e-3 at 1):
    float16 keeps 11 bits of each change, int8 rounds each layer's changes to a grid of max|change| / 127
    (a quarter of float32's bytes; benchmarks/studies/scale_file_dtype.py measures what that costs).
    """
    from ..checkpoint import atomic_write
    selector = scale_selector(model)
    if selector is None:
        raise ValueError("this model has no trainable scales; call enable_scale_training(model, ...) first")
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale file dtype {dtype!r}; choose one of {', '.join(SCALE_DTYPES)}")
    tensors = scales_state_dict(model)
    if dtype != "float32":
        init = _initial_scales(model)
        tensors = {k: v - init[k] for k, v in tensors.items()}
    mode = model._quantdream_scale_mode
    layout = [[name, list(layer.s_out[0].shape), layer.weight_shape[1]] for name, layer in quantized_layers(model)
              if layer.s_out is not None]
    packed = _pack(tensors, layout, selector.num_experts, _kinds(mode), dtype)
    meta = {"format": SCALES_FORMAT, "format_version": str(SCALES_FORMAT_VERSION),
            "mode": mode, "num_experts": str(selector.num_experts),
            "num_train_timesteps": str(selector.num_train_timesteps),
            "interval": json.dumps(selector.interval), "encoding": SCALE_DTYPES[dtype],
            "layout": json.dumps(layout, separators=(",", ":")), **(metadata or {})}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(packed, str(tmp), metadata=meta))
    return path


def _valid_layout(layout) -> bool:
    """``[[layer name, s_out shape, input channels], ...]`` as save_scales writes it."""
    def ints(xs):
        return all(isinstance(x, int) and x > 0 for x in xs)
    return isinstance(layout, list) and all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], list) and ints(e[1])
        and ints(e[2:]) for e in layout)


def _kinds(mode: str) -> tuple[str, ...]:
    return ("s_out", "s_in") if mode == "out_in" else ("s_out",)


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
    version = meta.get("format_version")
    if version not in [str(v) for v in range(1, SCALES_FORMAT_VERSION + 1)]:
        raise ValueError(f"{path} was written by scales format version {meta.get('format_version')}; this "
                         f"quantdream reads versions 1 to {SCALES_FORMAT_VERSION}")
    encoding = meta.get("encoding", "absolute")    # version 1 wrote absolute float32 scales
    if encoding not in SCALE_DTYPES.values():
        raise ValueError(f"{path} holds scales encoded as {encoding!r}; this quantdream reads "
                         f"{', '.join(SCALE_DTYPES.values())}")
    delta = encoding != "absolute"
    mode, n = meta["mode"], int(meta["num_experts"])
    if version == "3":      # 1 and 2 wrote one tensor per layer and set, already in the shape used below
        try:
            layout = json.loads(meta["layout"])
        except (KeyError, ValueError):
            layout = None
        if not _valid_layout(layout):
            raise ValueError(f"{path} is damaged: its header has no readable layout")
        tensors = _unpack(tensors, layout, n, _kinds(mode), encoding, path)
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
                for kind in _kinds(mode):
                    key = f"{name}.{kind}.{j}"
                    value = tensors[key].float() + init[key] if delta else tensors[key]
                    getattr(layer, kind)[j].copy_(value)
    return selector
