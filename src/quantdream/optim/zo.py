"""Zeroth-order gradient estimates and the Adam that consumes them (ZOODiP Eq. 3 / Eq. S10, §4).

RGE, one-sided, n Gaussian directions, forward passes only:

    g = (1/n) * sum_i [(L(theta + mu e_i) - L(theta)) / mu] * e_i,      e_i ~ N(0, I_d)

``scheme="central"`` is the two-sided (SPSA / antithetic) variant, 2n evaluations:

    g = (1/n) * sum_i [(L(theta + mu e_i) - L(theta - mu e_i)) / (2 mu)] * e_i

NOTE(paper): the official code also divides g by sqrt((d_eff + n - 1) / n) (d_eff = d minus the
directions Subspace Gradient removes); that is kept behind ``normalize=True``. With it, E|g|^2
no longer grows with d; with Adam's large eps (1e-3) it changes the step size, so it matters.

Every loss in one estimate must be computed with common random numbers (same image, caption,
noise and timestep); the caller evaluates ``candidates`` as one batch and hands back the losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

SCHEMES = ("forward", "central")
DISTRIBUTIONS = ("gaussian", "rademacher")


@dataclass(frozen=True)
class RandomGradientEstimator:
    """Random-direction finite differences. n -> ``n``, mu -> ``mu``."""

    n: int = 2
    mu: float = 1e-3
    scheme: str = "forward"          # forward: RGE (n+1 evals) | central: SPSA/antithetic (2n evals)
    distribution: str = "gaussian"   # gaussian e ~ N(0, I) | rademacher e ~ {-1, +1}^d
    normalize: bool = True           # NOTE(paper): divide by sqrt((d_eff + n - 1) / n) as the official code

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"number of directions n must be >= 1, got {self.n}")
        if not self.mu > 0:
            raise ValueError(f"perturbation scale mu must be > 0, got {self.mu}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown estimator scheme {self.scheme!r}; choose one of {SCHEMES}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown direction distribution {self.distribution!r}; choose one of {DISTRIBUTIONS}")

    @property
    def num_evaluations(self) -> int:
        """Objective evaluations (UNet forward passes per sample) per estimate."""
        return self.n + 1 if self.scheme == "forward" else 2 * self.n

    def directions(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> torch.Tensor:
        """(n, *shape) float32 directions from ``generator``."""
        e = torch.randn((self.n, *shape), generator=generator, device=generator.device, dtype=torch.float32)
        return e.sign() if self.distribution == "rademacher" else e

    def candidates(self, theta: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Points to evaluate, (K, *theta.shape): forward [theta, theta + mu e_1..n];
        central [theta + mu e_1..n, theta - mu e_1..n]."""
        theta = theta.float()[None]
        if self.scheme == "forward":
            return torch.cat([theta, theta + self.mu * e])
        return torch.cat([theta + self.mu * e, theta - self.mu * e])

    def estimate(self, losses: torch.Tensor, e: torch.Tensor, d_eff: int | None = None) -> torch.Tensor:
        """g from the K losses of ``candidates`` (same order) and the directions e: (n, *shape)."""
        losses = losses.float()
        if self.scheme == "forward":
            p = (losses[1:] - losses[0]) / self.mu                        # (n,) projected gradients
        else:
            p = (losses[: self.n] - losses[self.n:]) / (2 * self.mu)
        g = torch.einsum("n,n...->...", p, e) / self.n
        return g / self.divisor(e[0].numel() if d_eff is None else d_eff)

    def divisor(self, d: int) -> float:
        """NOTE(paper): the official code's sqrt((d_eff + n - 1) / n) (1 with ``normalize=False``)."""
        return math.sqrt((d + self.n - 1) / self.n) if self.normalize else 1.0

    def __call__(self, f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor,
                 generator: torch.Generator, d_eff: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimate the gradient of ``f`` (batched: (K, *shape) -> (K,)) at ``theta``.
        Returns (g, losses)."""
        e = self.directions(theta.shape, generator)
        losses = f(self.candidates(theta, e))
        return self.estimate(losses, e, d_eff), losses


class ZOAdam:
    """Adam on an estimated gradient, as the ZOODiP code's "ZOAdam":

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   k <- k + 1
        theta <- theta - lr * (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)

    NOTE(paper): eps = 1e-3, not 1e-8, and no weight decay. The reference keeps theta, m, v in
    FP16; here they are FP32 (small numerical differences from the reference are expected).
    """

    def __init__(self, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-3) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Adam betas must lie in [0, 1), got {betas}")
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.k = 0

    @torch.no_grad()
    def step(self, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Update ``theta`` (float32) in place with gradient estimate ``g`` and return it."""
        b1, b2 = self.betas
        if self.m is None:
            self.m, self.v = torch.zeros_like(theta), torch.zeros_like(theta)
        self.k += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = self.m / (1 - b1 ** self.k)
        v_hat = self.v / (1 - b2 ** self.k)
        theta.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))
        return theta

    def state_dict(self) -> dict:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "m": self.m, "v": self.v, "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.betas, self.eps = state["lr"], tuple(state["betas"]), state["eps"]
        self.m, self.v, self.k = state["m"], state["v"], state["k"]
