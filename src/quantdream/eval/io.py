"""Saving and loading the evaluator's networks: fp16 safetensors + a JSON config beside it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantdream.checkpoint import atomic_json, atomic_write

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "evaluator"


def export_weights(model: torch.nn.Module, config: dict, directory: str | Path, name: str, meta: dict | None = None) -> Path:
    """Write ``<name>.safetensors`` (fp16 floats, to keep the package small) and ``<name>.json``."""
    directory = Path(directory)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    path = directory / f"{name}.safetensors"
    atomic_write(path, lambda t: save_file(sd, t))
    atomic_json(directory / f"{name}.json", {"config": config, **(meta or {})})
    return path


def load_weights(model: torch.nn.Module, directory: str | Path, name: str) -> torch.nn.Module:
    """Load ``<name>.safetensors`` into ``model`` (fp32), strictly."""
    path = Path(directory) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"evaluator weights {path} not found; train them with "
                                f"`python -m quantdream.eval.train_evaluator {name}`")
    sd = load_file(str(path))
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) if k in ref else v for k, v in sd.items()}, strict=True)
    return model.eval()


def read_config(directory: str | Path, name: str) -> dict:
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"evaluator config {path} not found; train it with "
                                f"`python -m quantdream.eval.train_evaluator {name}`")
    return json.loads(path.read_text())
