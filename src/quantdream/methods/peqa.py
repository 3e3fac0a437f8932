"""PEQA (Kim et al., NeurIPS 2023) on the quantized UNet with the DreamBooth loss (TuneQDM's baseline):

    W = (s0 + delta_s) (W_q - z),    s = s0 + delta_s in R^m per output channel, the only trained tensor

W_q, z, biases and everything else stay frozen; s starts at the quantizer's scale s0. The UNet is
quantized per output channel (int8 symmetric, or ``--weights int4`` asymmetric with one group per
row); text encoder and VAE stay float, as in TuneQDM's code. Output: OUT/scales.safetensors, the
trained scales only (~1.3 MB on SD-1.5), which ``quantdream generate --adapter`` applies to a freshly
quantized UNet. ``ScaleTuning`` is shared with TuneQDM (tuneqdm.py): the same loop with s_in and
timestep-selected scale sets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .gradient import GradientConfig, GradientMethod

SCALES_FILE = "scales.safetensors"


@dataclass(frozen=True)
class PeqaConfig(GradientConfig):
    lr: float = 3e-6                  # ZOODiP §S1.5 / TuneQDM's script (AdamW, wd 1e-2, 400 steps)
    max_grad_norm: float = 0.0        # NOTE(paper): TuneQDM's script does not clip


class ScaleTuning(GradientMethod):
    """Train quantization scales of every quantized UNet layer (quant/scales.py)."""

    default_weights = "int8"
    weight_choices = ("int8", "int4")
    mode = "out"                      # "out": s_out (PEQA); "out_in": also s_in (TuneQDM MCSU)

    def scale_sets(self) -> tuple[int, tuple[int, int] | None]:
        """(number of timestep experts N, S1 interval or None)."""
        return 1, None

    @classmethod
    def prepare_model(cls, text_encoder, vae, unet, weights: str, config) -> None:
        from ..quant import quantize_model
        quantize_model(unet, weights, group_size=0)          # one scale per output channel

    def make_trainable(self, unet) -> list[torch.nn.Parameter]:
        from ..quant import enable_scale_training, scale_parameters
        n, interval = self.scale_sets()
        self.selector = enable_scale_training(unet, self.mode, n, interval=interval,
                                              num_train_timesteps=self.objective.num_train_timesteps)
        return scale_parameters(unet)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.selector.num_experts > 1 and ctx.batch_size > 1:
            raise ValueError(f"{self.name} with {self.selector.num_experts} timestep experts trains one timestep "
                             f"per step (TuneQDM's code assumes batch 1); use --batch-size 1")

    def export_files(self, out: Path) -> list[Path]:
        return [save_scale_file(self.unet, Path(out) / SCALES_FILE)]

    def adapter_info(self) -> dict:
        return {"kind": "scales", "path": SCALES_FILE, **quant_meta(self.unet)}

    def summary(self) -> dict:
        n, interval = self.scale_sets()
        return {**super().summary(), "scale_mode": self.mode, "num_experts": n,
                "interval": list(interval) if interval else None, **quant_meta(self.unet)}


class Peqa(ScaleTuning):
    name = "peqa"
    config_class = PeqaConfig


def quant_meta(unet) -> dict:
    """How the UNet was quantized: what a loader needs to rebuild the same layers before loading scales."""
    from ..quant import quantized_layers
    layers = [m for _, m in quantized_layers(unet)]
    bits = sorted({m.bits for m in layers})
    return {"weights": f"int{bits[0]}" if len(bits) == 1 else "mixed", "group_size": 0}


def save_scale_file(unet, path: Path) -> Path:
    """quant.save_scales' format (load_scales reads it) plus the quantization it belongs to."""
    from ..checkpoint import atomic_write
    from ..quant.scales import SCALES_FORMAT, SCALES_FORMAT_VERSION, scale_selector, scales_state_dict
    sel = scale_selector(unet)
    meta = {"format": SCALES_FORMAT, "format_version": str(SCALES_FORMAT_VERSION),
            "mode": unet._quantdream_scale_mode, "num_experts": str(sel.num_experts),
            "num_train_timesteps": str(sel.num_train_timesteps), "interval": json.dumps(sel.interval),
            **{f"quantdream_{k}": str(v) for k, v in quant_meta(unet).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = scales_state_dict(unet)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path
