"""PEQA (Kim et al., NeurIPS 2023) on the quantized UNet with the DreamBooth loss (TuneQDM's baseline):

    W = (s0 + delta_s) (W_q - z),    s = s0 + delta_s in R^m per output channel, the only trained tensor

W_q, z, biases and everything else stay frozen; s starts at the quantizer's scale s0. The UNet is
quantized per output channel (int8 symmetric, or ``--weights int4`` asymmetric with one group per
row); text encoder and VAE stay float, as in TuneQDM's code. Output: OUT/scales.safetensors, the
trained scales only (0.32 M values on SD-1.5: 0.34 MB as the int8 changes written by default, 1.3 MB as float32
scales with ``--set peqa.file_dtype=float32``, the paper's 1.32 MB), which ``quantdream generate --adapter`` applies to a freshly
quantized UNet. ``ScaleTuning`` is shared with TuneQDM (tuneqdm.py): the same loop with s_in and
timestep-selected scale sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import section_name
from .gradient import GradientConfig, GradientMethod

SCALES_FILE = "scales.safetensors"


@dataclass(frozen=True)
class PeqaConfig(GradientConfig):
    lr: float = 3e-6                  # ZOODiP §S1.5 / TuneQDM's script (AdamW, wd 1e-2, 400 steps)
    max_grad_norm: float = 0.0        # NOTE(paper): TuneQDM's script does not clip
    file_dtype: str = "int8"          # scale file: int8 or float16 changes from the start, or float32 scales


class ScaleTuning(GradientMethod):
    """Train quantization scales of every quantized UNet layer (quant/scales.py)."""

    default_weights = "int8"
    weight_choices = ("int8", "int4")
    mode = "out"                      # "out": s_out (PEQA); "out_in": also s_in (TuneQDM MCSU)

    def __init__(self, objective, theta0, config) -> None:
        from ..quant.scales import SCALE_DTYPES
        if config.file_dtype not in SCALE_DTYPES:
            raise ValueError(f"{section_name(self.name)}.file_dtype = {config.file_dtype!r}; choose one of "
                             f"{', '.join(SCALE_DTYPES)}")
        super().__init__(objective, theta0, config)

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
        return [save_scale_file(self.unet, Path(out) / SCALES_FILE, self.config.file_dtype)]

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


def save_scale_file(unet, path: Path, dtype: str = "int8") -> Path:
    """quant.save_scales' format (load_scales reads it) plus the quantization it belongs to."""
    from ..quant import save_scales
    return save_scales(unet, path, dtype=dtype,
                       metadata={f"quantdream_{k}": str(v) for k, v in quant_meta(unet).items()})
