"""The denoising objective shared by every personalization method (LDM Eq. 1):

    z_t = sqrt(abar_t) * z + sqrt(1 - abar_t) * eps,      eps ~ N(0, I),  t ~ U{T_L, ..., T_U - 1}
    L   = mean over elements of (eps - eps_phi(z_t, t, c))^2

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


def epsilon_mse(pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample epsilon-prediction MSE in float32: (B, ...) -> (B,)."""
    return (pred.float() - eps.float()).pow(2).flatten(1).mean(1)


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
