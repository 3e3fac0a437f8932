"""Stable Diffusion architectures without weights: SD-1.5, SD-2.1 and SDXL components built from
their published diffusers / transformers configs (``assets/arch/<arch>.json``), for tests and
memory/speed benchmarks. Nothing is downloaded.

    build("sd15", "unet")                      random weights, fast init (see ``init``)
    build("sdxl", "text_encoder_2", init="meta")   parameters on the meta device (no memory)
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

ARCH_DIR = Path(__file__).resolve().parent.parent / "assets" / "arch"
ARCHITECTURES = ("sd15", "sd21", "sdxl")
_ALIASES = {"sd-1.5": "sd15", "sd1.5": "sd15", "sd-2.1": "sd21", "sd2.1": "sd21", "sd-xl": "sdxl"}
INITS = ("fast", "default", "meta")


def canonical(arch: str) -> str:
    a = _ALIASES.get(arch.lower(), arch.lower())
    if a not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return a


@lru_cache(maxsize=None)
def _spec(arch: str) -> dict:
    spec = json.loads((ARCH_DIR / f"{arch}.json").read_text())
    spec.pop("_comment", None)
    return spec


def component_names(arch: str) -> list[str]:
    return list(_spec(canonical(arch)))


def arch_config(arch: str, component: str) -> dict:
    """``{"library", "class", "config"}`` of one component (a fresh copy)."""
    spec = _spec(canonical(arch))
    if component not in spec:
        raise ValueError(f"{arch} has no component {component!r}; it has {', '.join(spec)}")
    return json.loads(json.dumps(spec[component]))


def _construct(entry: dict) -> nn.Module:
    if entry["library"] == "diffusers":
        import diffusers
        return getattr(diffusers, entry["class"]).from_config(entry["config"])
    import transformers
    cls = getattr(transformers, entry["class"])
    return cls(cls.config_class(**entry["config"]))


def _fill_(model: nn.Module, generator: torch.Generator, device) -> None:
    """Replace meta parameters with random ones: weights ~ N(0, 1/fan_in) (embeddings N(0, 0.02^2)),
    1-D norm weights 1, biases 0. Parameters are made one at a time."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, dtype=p.dtype, device=device)
            if isinstance(mod, nn.Embedding):
                t.normal_(0.0, 0.02, generator=generator)
            elif name == "bias":
                t.zero_()
            elif p.dim() == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 1.0 / math.sqrt(max(1, math.prod(p.shape[1:]))), generator=generator)
            mod._parameters[name] = nn.Parameter(t, requires_grad=p.requires_grad)


def build(arch: str, component: str, *, init: str = "fast", seed: int = 0, device: str | torch.device = "cpu",
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """One component of ``arch`` with random weights, in eval mode.

    init: ``"fast"`` builds parameters on the meta device (buffers real) and fills them from a seeded
    normal (seconds for SD-1.5); ``"default"`` runs the library's own initialization (slow at SD size);
    ``"meta"`` leaves parameters on the meta device (counting, meta-device loading).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}; choose one of {', '.join(INITS)}")
    entry = arch_config(arch, component)
    if init == "default":
        model = _construct(entry)
    else:
        from accelerate import init_empty_weights
        with init_empty_weights(include_buffers=False):
            model = _construct(entry)
        if init == "fast":
            _fill_(model, torch.Generator(device="cpu").manual_seed(seed), "cpu")
    if init != "meta" and (torch.device(device) != torch.device("cpu") or dtype != torch.float32):
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def build_components(arch: str, components: list[str] | None = None, **kw) -> dict[str, nn.Module]:
    return {c: build(arch, c, **kw) for c in (components or component_names(arch))}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=8, sample_size=16)
TINY_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, projection_dim=32, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)


def tiny_components(seed: int = 0) -> dict[str, nn.Module]:
    """SD-shaped UNet / VAE / CLIP text encoder small enough for unit tests (milliseconds a call)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return {"unet": UNet2DConditionModel(**TINY_UNET).eval(), "vae": AutoencoderKL(**TINY_VAE).eval(),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()}
