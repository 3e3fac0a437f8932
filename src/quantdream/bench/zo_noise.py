"""``quantdream bench zo-noise``: how well zeroth-order finite differences in a dtype follow float64 ones on a
model (the measurement behind ``precision.MIN_MU``; see ``quantdream.precision``)."""
from __future__ import annotations

import copy
import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..precision import DTYPES, MIN_CORRELATION


@dataclass(frozen=True)
class NoiseSpec:
    model: str = "tiny"                 # tiny | sd15 | sd21 (random weights) | a local diffusers folder
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    mus: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    n: int = 16                         # directions
    timesteps: tuple[int, ...] = (300, 600, 850)
    resolution: int = 0                 # px; 0: the model's native size
    seed: int = 0
    device: str = "cpu"


ARCH_NAMES = ("sd15", "sd21", "sd-1.5", "sd-2.1")


def _components(spec: NoiseSpec) -> dict:
    """tokenizer, text_encoder (float32), scheduler, and ``unet(dtype)``: a fresh UNet in that dtype (an
    architecture name is rebuilt from its seed each time and converted in place, so SD-1.5's float64
    reference costs its own 6.9 GB and no float32 copy beside it)."""
    if spec.model in ARCH_NAMES:
        from diffusers import DDPMScheduler
        from transformers import CLIPTokenizer

        from ..models import embedded
        from ..models.arch import build
        te = build(spec.model, "text_encoder", seed=spec.seed + 2).to(spec.device)
        tok = CLIPTokenizer.from_pretrained(str(embedded.TOKENIZER_DIR),
                                            model_max_length=te.config.max_position_embeddings)
        return dict(tokenizer=tok, text_encoder=te, scheduler=DDPMScheduler(**embedded.SCHEDULER_CONFIG),
                    unet=lambda dtype: build(spec.model, "unet", seed=spec.seed).to(spec.device, dtype))
    from ..train import load_components
    c = load_components(spec.model, torch.device(spec.device), torch.float32)
    return dict(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], scheduler=c["scheduler"],
                unet=lambda dtype: copy.deepcopy(c["unet"]).to(dtype))


@contextmanager
def _float64_losses():
    """The reference's MSE in float64 (the objective's is float32, which would round the differences)."""
    from ..methods import base
    old = base.denoising_mse
    base.denoising_mse = lambda pred, target: (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    try:
        yield
    finally:
        base.denoising_mse = old


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    d = float(a.norm() * b.norm())
    return float((a * b).sum()) / d if d > 0 else float("nan")


@torch.no_grad()
def zo_noise(spec: NoiseSpec, log=lambda s: None) -> dict:
    """{"rows": [{dtype, mu, correlation (mean over t), per_t, ...}], ...}: see the module docstring."""
    from ..data.dataset import Batch
    from ..diffusion import TimestepSampler
    from ..methods.base import DenoisingObjective, add_placeholder
    from ..optim.zo import RandomGradientEstimator
    for d in spec.dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtype {d!r}: choose fp32, bf16 or fp16")
    if any(not mu > 0 for mu in spec.mus):
        raise ValueError(f"--mu must be > 0, got {spec.mus}")
    c = _components(spec)
    ph = add_placeholder(c["tokenizer"], c["text_encoder"], "<zo-noise>", "bag")
    unet = c["unet"](torch.float32)
    ucfg = unet.config
    del unet
    side = spec.resolution // 8 if spec.resolution else ucfg.sample_size
    g = torch.Generator().manual_seed(spec.seed)
    z = torch.randn(1, ucfg.in_channels, side, side, generator=g)
    batch = Batch(latents=z, captions=["a photo of a <zo-noise>"], index=[0], flipped=[False])
    theta = ph.init_vectors

    def objective(dtype):
        te = copy.deepcopy(c["text_encoder"]).double() if dtype == torch.float64 else c["text_encoder"]
        return DenoisingObjective(c["tokenizer"], te, c["unet"](dtype), c["scheduler"], ph, device=spec.device,
                                  dtype=dtype)

    def differences(obj, e, est, t, f64=False):
        obj.set_timesteps(TimestepSampler(t, t + 1))
        cand = est.candidates(theta, e)
        with (_float64_losses() if f64 else _nullctx()):
            losses = obj(cand, batch, torch.Generator().manual_seed(spec.seed + t))   # CPU draws: any device
        return (losses[1:].double() - losses[0].double()) / est.mu

    e = torch.randn((spec.n, *theta.shape), generator=g).to(theta.device)
    ref, rows = {}, []
    ref_obj = objective(torch.float64)
    for mu in spec.mus:
        est = RandomGradientEstimator(n=spec.n, mu=mu)
        for t in spec.timesteps:
            ref[mu, t] = differences(ref_obj, e, est, t, f64=True)
    ref_obj.close()
    del ref_obj
    gc.collect()
    for d in spec.dtypes:
        dtype = DTYPES[d]
        obj = objective(dtype)
        for mu in spec.mus:
            est = RandomGradientEstimator(n=spec.n, mu=mu)
            per_t = {}
            for t in spec.timesteps:
                per_t[t] = _pearson(differences(obj, e, est, t), ref[mu, t])
            corr = sum(per_t.values()) / len(per_t)
            row = {"dtype": d, "mu": mu, "correlation": round(corr, 4),
                   "per_timestep": {str(t): round(v, 4) for t, v in per_t.items()},
                   "ok": bool(corr >= MIN_CORRELATION and not math.isnan(corr))}
            rows.append(row)
            log(f"{d} mu={mu:g}: correlation {corr:.3f} ({', '.join(f't={t}: {v:.3f}' for t, v in per_t.items())})")
        obj.close()
        del obj
        gc.collect()
    device = torch.device(spec.device)
    extra = {} if device.type != "cuda" else {   # cuDNN convolutions in TF32 by default: "fp32" is TF32 there
        "gpu": torch.cuda.get_device_name(device), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return {"model": spec.model, "device": str(device), **extra, "resolution": spec.resolution or side * 8, "n": spec.n,
            "timesteps": list(spec.timesteps), "seed": spec.seed, "min_correlation": MIN_CORRELATION,
            "weights": "float (unquantized)", "rows": rows}


@contextmanager
def _nullctx():
    yield
