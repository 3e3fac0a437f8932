"""``quantize_model``: swap every ``nn.Linear`` / ``nn.Conv2d`` of a model for its quantized twin."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Iterator

from torch import nn

from .modules import QConv2d, QLinear, QuantizedLayer

logger = logging.getLogger(__name__)

WEIGHT_SCHEMES = {"none": None, "int8": 8, "int4": 4, "int2": 2}


def parse_weights(weights: str) -> int | None:
    """``"int8" -> 8``, ``"none" -> None``; anything else is refused with the list of choices."""
    if weights not in WEIGHT_SCHEMES:
        raise ValueError(f"weights={weights!r} is not supported; choose one of {', '.join(WEIGHT_SCHEMES)}")
    return WEIGHT_SCHEMES[weights]


def _check_group_size(group_size) -> None:
    if group_size is not None and (not isinstance(group_size, int) or group_size < 0):
        raise ValueError(f"group_size must be a non-negative integer (0 = per output channel), got {group_size!r}")


def _quantizable(mod: nn.Module) -> type[QuantizedLayer] | None:
    """The quantized class for ``mod``; None for anything else (embeddings, norms, or a Linear/Conv2d
    subclass with its own forward, which a plain swap would silently change)."""
    if isinstance(mod, nn.Linear):
        return QLinear if type(mod).forward is nn.Linear.forward else None
    if isinstance(mod, nn.Conv2d):
        same = type(mod).forward is nn.Conv2d.forward and type(mod)._conv_forward is nn.Conv2d._conv_forward
        return QConv2d if same else None
    return None


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def quantize_model(model: nn.Module, weights: str = "int8", *, group_size: int | None = 128,
                   skip: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Quantize ``model`` in place and return it.

    weights: ``"int8"`` symmetric per-output-channel RTN, ``s = max|W|/127`` (quanto's qint8, ZOODiP);
        ``"int4"`` / ``"int2"`` asymmetric group-wise RTN, codes packed 2 / 4 per byte;
        ``"none"`` leaves the model as it is.
    group_size: inputs per group for int4/int2 (quanto's rule, see ``rtn.resolve_group_size``);
        0 or None quantizes per output channel (PEQA / TuneQDM's form).
    skip: ``skip(qualified_name, module) -> True`` keeps that layer float.

    Layers are quantized one at a time and each float weight is released as soon as its codes
    exist, so the model never holds two full copies. Embeddings and norms stay float.
    """
    bits = parse_weights(weights)
    _check_group_size(group_size)
    if bits is None:
        return model
    if _quantizable(model) is not None:
        raise ValueError(f"quantize_model swaps layers inside a model; for a lone {type(model).__name__} "
                         f"use {_quantizable(model).__name__}.from_module(layer, bits=...)")
    names, seen = [], Counter()
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and _quantizable(mod) is None:
            logger.warning("leaving %s float: %s overrides forward", name, type(mod).__name__)
            continue
        if _quantizable(mod) is not None and not (skip is not None and skip(name, mod)):
            names.append(name)
            seen[id(mod)] += 1
    shared: dict[int, tuple[nn.Module, QuantizedLayer]] = {}  # modules reachable under several names
    for name in names:
        parent, attr = _parent(model, name)
        mod = getattr(parent, attr)
        if id(mod) in shared:
            q = shared[id(mod)][1]
        else:
            q = _quantizable(mod).from_module(mod, bits, group_size)
            q.train(mod.training)
            if seen[id(mod)] > 1:
                shared[id(mod)] = (mod, q)
        setattr(parent, attr, q)
        del mod, q  # the float weight goes with the last reference
    shared.clear()
    return model


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLayer):
            yield name, mod


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
