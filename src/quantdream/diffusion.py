"""The denoising objective shared by every personalization method (LDM Eq. 1):

    z_t = sqrt(abar_t) * z + sqrt(1 - abar_t) * eps,      eps ~ N(0, I),  t ~ U{T_L, ..., T_U - 1}
    L   = mean over elements of (y - f_phi(z_t, t, c))^2

The target y is what the model's scheduler says its UNet predicts (``prediction_type``):
    epsilon        y = eps                                             (SD-1.x, SD-2.x base 512)
    v_prediction   y = v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * z   (SD-2.x 768 v; Salimans & Ho 2022, Eq. 10)
    sample         y = z                                               (predicts the clean latent)
Every method's loss goes through :func:`target` and :func:`denoising_mse`.

Timesteps are uniform over [0, T) or, with PUTS (ZOODiP Eq. 9), over [T_L, T_U) = [500, 900).
Every random draw takes an explicit ``torch.Generator``; nothing here touches the global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimestepSampler:
    """t ~ U{t_low, ..., t_high - 1}; the upper bound is excluded, as in ZOODiP's ``randint(500, 900)``."""

    t_low: int = 0
    t_high: int = 1000

    def __post_init__(self) -> None:
        if not (0 <= self.t_low < self.t_high):
            raise ValueError(f"timestep range [{self.t_low}, {self.t_high}) is empty or negative; "
                             f"need 0 <= T_L < T_U (PUTS uses 500, 900)")

    def check(self, num_train_timesteps: int) -> None:
        if self.t_high > num_train_timesteps:
            raise ValueError(f"timestep range [{self.t_low}, {self.t_high}) goes past the scheduler's "
                             f"{num_train_timesteps} training timesteps")

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) int64 timesteps on the generator's device."""
        return torch.randint(self.t_low, self.t_high, (n,), generator=generator, device=generator.device)


def uniform(num_train_timesteps: int = 1000) -> TimestepSampler:
    return TimestepSampler(0, num_train_timesteps)


def puts(t_low: int = 500, t_high: int = 900) -> TimestepSampler:
    """Partial Uniform Timestep Sampling (ZOODiP §3.4): only the noisier timesteps."""
    return TimestepSampler(t_low, t_high)


def add_noise(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(z_t | z). z, eps: (B, C, h, w); t: (B,) int; alphas_cumprod: (T,)."""
    abar = alphas_cumprod.to(device=z.device, dtype=torch.float32)[t].view(-1, *([1] * (z.dim() - 1)))
    return (abar.sqrt() * z.float() + (1 - abar).sqrt() * eps.float()).to(z.dtype)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the model's scheduler has prediction_type {prediction_type!r}; quantdream trains "
                         f"{', '.join(PREDICTION_TYPES)}")
    return prediction_type


def target(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
           prediction_type: str = "epsilon") -> torch.Tensor:
    """What the UNet should output at (z_t, t), in float32; the same as diffusers' training scripts
    (``noise``, ``scheduler.get_velocity(latents, noise, t)``, ``latents``)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps.float()
    if prediction_type == "sample":
        return z.float()
    abar = alphas_cumprod.to(device=z.device, dtype=torch.float32)[t].view(-1, *([1] * (z.dim() - 1)))
    return abar.sqrt() * eps.float() - (1 - abar).sqrt() * z.float()


def denoising_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE to the target in float32: (B, ...) -> (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def epsilon_mse(pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample epsilon-prediction MSE (:func:`denoising_mse` with the epsilon target)."""
    return denoising_mse(pred, eps)


@dataclass
class NoiseDraw:
    """One step's shared randomness (common random numbers): every candidate sees the same t and eps."""

    t: torch.Tensor    # (B,) int64
    eps: torch.Tensor  # (B, C, h, w)


def draw_noise(shape: tuple[int, ...], sampler: TimestepSampler, generator: torch.Generator,
               dtype: torch.dtype = torch.float32) -> NoiseDraw:
    """Draw t then eps for a batch of latents of ``shape`` (B, C, h, w), in that order."""
    t = sampler(shape[0], generator)
    eps = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(dtype)
    return NoiseDraw(t=t, eps=eps)
