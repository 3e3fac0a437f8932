"""LoRA (Hu et al., ICLR 2022) on the UNet's attention projections, through peft; QLoRA (Dettmers et
al., NeurIPS 2023) is the same adapter over a 4-bit frozen base:

    h = W0 x + (alpha / r) * B A x,     A: (r, n) ~ N(0, 1/r),  B: (m, r) = 0,   only A and B train

Targets: to_q, to_k, to_v, to_out.0 of every attention block (diffusers' train_dreambooth_lora.py).
QLoRA's base: every Linear as bitsandbytes NF4 (block 64, double quantization, methods.md §4.3),
every Conv2d as quantdream int4 (bitsandbytes has no Conv2d). Output: pytorch_lora_weights.safetensors
in diffusers/peft format, read by stock ``pipe.load_lora_weights(OUT)``.
NOTE(paper): ZOODiP's QLoRA baseline: r=2, lr 1e-4, 500 steps; its data type and target modules are
not stated (methods.md §4.3) - NF4 and the attention projections are assumed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .gradient import GradientConfig, GradientMethod

logger = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
BNB_HINT = "pip install 'quantdream[bnb]'"


@dataclass(frozen=True)
class LoraConfig(GradientConfig):
    lr: float = 1e-4                  # ZOODiP §S1.5 (QLoRA baseline)
    rank: int = 2                     # r (ZOODiP's baseline)
    alpha: float = 2.0                # lora_alpha; = r as in diffusers' script, so alpha / r = 1
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    conv_group_size: int = 128        # quantdream int4 Conv2d groups (quanto's rule)
    nf4_blocksize: int = 64           # QLoRA: block 64, absmax per block
    double_quant: bool = True         # QLoRA: absmax constants quantized to 8 bits


def _peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError(f"lora / qlora need peft: {BNB_HINT}") from None


class Lora(GradientMethod):
    name = "lora"
    integrations = ("peft", "bitsandbytes")
    config_class = LoraConfig

    def make_trainable(self, unet) -> list[nn.Parameter]:
        _peft()
        from peft import LoraConfig as PeftLoraConfig
        c = self.config
        if c.rank < 1:
            raise ValueError(f"{self.name}.rank must be >= 1, got {c.rank}")
        unet.requires_grad_(False)
        unet.add_adapter(PeftLoraConfig(r=c.rank, lora_alpha=c.alpha, init_lora_weights="gaussian",
                                        target_modules=list(c.targets)))
        return [p for p in unet.parameters() if p.requires_grad]

    def setup(self, ctx) -> None:
        """Redraw A ~ N(0, 1/r) (peft's "gaussian" init) from the run's seed: peft draws from the global RNG."""
        super().setup(ctx)
        g = torch.Generator().manual_seed(getattr(ctx, "seed", 0) * 1000 + 6)
        with torch.no_grad():
            for name, p in self.unet.named_parameters():
                if ".lora_A." in name:
                    p.copy_(torch.randn(p.shape, generator=g) / self.config.rank)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}

    def export_files(self, out: Path) -> list[Path]:
        from diffusers import StableDiffusionPipeline
        StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=self.lora_state_dict(),
                                                  weight_name=LORA_WEIGHTS, safe_serialization=True)
        return [Path(out) / LORA_WEIGHTS]

    def adapter_info(self) -> dict:
        return {"kind": "lora", "path": LORA_WEIGHTS}


class QLora(Lora):
    name = "qlora"
    config_class = QLoraConfig
    default_weights = "nf4"
    weight_choices = ("nf4",)

    @classmethod
    def prepare_model(cls, text_encoder, vae, unet, weights: str, config) -> None:
        """UNet only (text encoder and VAE stay as loaded): Conv2d -> int4, Linear -> NF4."""
        from ..quant import quantize_model
        quantize_model(unet, "int4", group_size=config.conv_group_size,
                       skip=lambda name, m: isinstance(m, nn.Linear))
        unet._quantdream_linear_backend = to_nf4(unet, config.nf4_blocksize, config.double_quant)

    def summary(self) -> dict:
        return {**super().summary(), "linear_backend": getattr(self.unet, "_quantdream_linear_backend", "?"),
                "conv_backend": "quantdream int4"}


def bnb_linear4bit_works() -> str | None:
    """None if bitsandbytes' NF4 Linear4bit runs forward and backward on this machine, else why not."""
    try:
        import bitsandbytes as bnb
        lin = nn.Linear(64, 8)
        q = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q = q.to(lin.weight.device)
        x = torch.randn(2, 64, requires_grad=True)
        q(x).sum().backward()
        return None
    except Exception as e:  # ImportError, missing CPU kernels, ...
        return f"{type(e).__name__}: {e}"


def to_nf4(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> str:
    """Swap every nn.Linear for bitsandbytes' NF4 Linear4bit (in place); returns the backend used.
    Without a working bitsandbytes the Linear layers stay float and a warning says so."""
    why = bnb_linear4bit_works()
    if why is not None:
        logger.warning("qlora: bitsandbytes NF4 Linear4bit is not usable here (%s); the UNet's Linear layers "
                       "stay float (only its Conv2d are int4), so this is LoRA on a partly quantized base. "
                       "Fix: %s", why, BNB_HINT)
        return f"float (bitsandbytes unavailable: {why})"
    import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              compute_dtype=mod.weight.dtype, compress_statistics=double_quant, quant_type="nf4",
                              device=mod.weight.device)
        q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4", blocksize=blocksize,
                                     compress_statistics=double_quant)
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.data, requires_grad=False)
        setattr(parent, attr, q.to(mod.weight.device))   # .to() packs the weight to NF4
    return f"bitsandbytes nf4 (block {blocksize}, double quant {double_quant})"
