"""ZOODiP (Seo, Jeong, Lee, Chun, "Efficient Personalization of Quantized Diffusion Model without
Backpropagation", CVPR 2025; https://arxiv.org/abs/2503.14868, code https://github.com/ignoww/ZOODiP):
textual inversion with forward passes only.

    e_i ~ N(0, I),  p_i = (L(theta + mu e_i) - L(theta)) / mu                       RGE, Eq. 3
    g   = sum_i p_i e_i / (n * sqrt((d_eff + n - 1) / n))                            NOTE(paper): code's norm.
    g   = g (I - P_nu^T P_nu)                                                        SG, Eq. 8
    theta <- ZOAdam(theta, g; lr, eps=1e-3);  buffer.push(theta); every tau steps rebuild P_nu
    t ~ U{T_L, ..., T_U - 1} = U{500, ..., 899}                                      PUTS, Eq. 9
                                       (embedded model: U{800, ..., 999} and n = 8, train.EMBEDDED_DEFAULTS)

The clean and the n perturbed tokens run as ONE batch through the text encoder and the UNet, with
one draw of image, caption, eps and t (common random numbers). No autograd anywhere. Every part is
switchable for ablations (``sg``, ``puts``, ``normalize``, ``scheme``, ``distribution``).

Beyond the paper (off by default, so ``zoodip`` stays the paper's method):
    schedule = "cosine"        lr_k = lr * (f + (1 - f) * (1 + cos(pi k / K)) / 2),  f = ``final_lr``
    subspace_directions = true e_i <- e_i (I - P_nu^T P_nu): perturb only where SG keeps the gradient,
                               so the finite differences carry no noise from the removed directions
    vocab_directions = k       e_i <- e_i V_k^T V_k, V_k the top-k principal directions of the vocabulary's
                               token rows: search where real tokens vary (an RGE's variance grows with the
                               dimension it searches; d_eff = k)

``zoodip-fast`` (class ZoodipFast) is the winner of the personalization search, shipped under its own name: the same
method with ``vocab_directions = 16`` and, on the embedded model, 1/3 of ZOODiP's steps at n = 2 (1/9 of its UNet
passes) at ZOODiP's embedded PUTS interval [800, 1000) (train.EMBEDDED_DEFAULTS; on SD folders the paper's [500, 900)).
Evidence (10 subjects) and its failure case: docs/personalization.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..diffusion import puts, uniform
from ..optim.subspace import SubspaceGradient
from ..optim.zo import RandomGradientEstimator, ZOAdam
from . import section_name
from .base import DenoisingObjective, Method, Streams


@dataclass(frozen=True)
class ZoodipConfig:
    """Paper values for SD-1.5 (methods.md 1.9)."""

    lr: float = 5e-3             # paper §4; NOTE(paper): train_zoodip.sh uses 1e-2 (and 1e-2 for SD-2.1)
    n: int = 2                   # directions per step (n + 1 forward passes)
    mu: float = 1e-3             # perturbation scale
    normalize: bool = True       # NOTE(paper): code divides g by sqrt((d_eff + n - 1) / n)
    scheme: str = "forward"      # forward = RGE (paper); central = SPSA / antithetic (Table S4)
    distribution: str = "gaussian"
    adam_eps: float = 1e-3       # NOTE(paper): the reference's ZOAdam eps
    betas: tuple[float, float] = (0.9, 0.999)
    sg: bool = True              # Subspace Gradient on/off
    tau: int = 128               # SG buffer length and rebuild period
    nu: float = 1e-3             # SG cut-off: keep components up to 1 - nu explained variance
    puts: bool = True            # PUTS on/off (off: t ~ U{0, ..., 999})
    t_low: int = 500
    t_high: int = 900
    schedule: str = "constant"   # constant (paper) | cosine: decays to lr * final_lr at the last step
    final_lr: float = 0.1        # cosine only: the last step's lr as a fraction of lr
    subspace_directions: bool = False  # draw e_i inside the SG-kept subspace (needs sg)
    vocab_directions: int = 0    # > 0: draw e_i inside the top-k PCA subspace of the vocabulary
    estimator: str = "rge"       # rge (the method) | expected: study oracle, E_e[g] by backprop (not forward-only)


SCHEDULES = ("constant", "cosine")
ESTIMATORS = ("rge", "expected")


class Zoodip(Method):
    name = "zoodip"
    config_class = ZoodipConfig

    def __init__(self, objective: DenoisingObjective, theta0: torch.Tensor,
                 config: ZoodipConfig = ZoodipConfig()) -> None:
        super().__init__(objective, theta0, config)
        if config.schedule not in SCHEDULES:
            raise ValueError(f"zoodip.schedule = {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if config.estimator not in ESTIMATORS:
            raise ValueError(f"zoodip.estimator = {config.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if config.subspace_directions and not config.sg:
            raise ValueError("zoodip.subspace_directions = true needs zoodip.sg = true (the subspace comes from SG)")
        objective.set_timesteps(puts(config.t_low, config.t_high) if config.puts
                                else uniform(objective.num_train_timesteps))
        self.estimator = RandomGradientEstimator(n=config.n, mu=config.mu, scheme=config.scheme,
                                                 distribution=config.distribution, normalize=config.normalize)
        self.adam = ZOAdam(lr=config.lr, betas=tuple(config.betas), eps=config.adam_eps)
        self.sg = SubspaceGradient(self.theta.numel(), tau=config.tau, nu=config.nu) if config.sg else None
        self.V = None
        if config.vocab_directions:
            if config.vocab_directions < 0 or config.vocab_directions > self.theta.shape[-1]:
                raise ValueError(f"{section_name(self.name)}.vocab_directions = {config.vocab_directions}; "
                                 f"choose 0 (off) or 1..{self.theta.shape[-1]} (the token width)")
            from .gfti import vocabulary_pca
            self.V = vocabulary_pca(objective, config.vocab_directions)[1].to(self.theta.device)
        self.total_steps = 0  # set by setup(); the cosine schedule needs it

    def setup(self, ctx) -> None:
        self.total_steps = ctx.steps

    @property
    def lr(self) -> float:
        """The step size of the next step (the schedule's value at step k = steps done so far)."""
        c = self.config
        if c.schedule == "constant" or self.total_steps <= 1:
            return float(c.lr)
        p = min(1.0, self.adam.k / (self.total_steps - 1))
        return float(c.lr * (c.final_lr + (1 - c.final_lr) * 0.5 * (1 + math.cos(math.pi * p))))

    @property
    def d_eff(self) -> int:
        d = self.sg.d_eff if self.sg is not None else self.theta.numel()
        return d if self.V is None else min(d, self.V.shape[0] * self.theta.shape[0])

    @torch.no_grad()
    def step(self, batch, streams: Streams) -> torch.Tensor:
        if self.config.estimator == "expected":
            g, loss = self.expected_estimate(batch, streams)
            return self.update(g, loss)
        e = self.estimator.directions(self.theta.shape, streams.directions)     # (n, V, d)
        if self.V is not None:
            e = e @ self.V.T @ self.V                                          # e_i V_k^T V_k
        if self.config.subspace_directions:
            e = torch.stack([self.sg.project(e_i) for e_i in e])              # e_i (I - P^T P)
        candidates = self.estimator.candidates(self.theta, e)                  # (n+1, V, d)
        losses = self.objective(candidates, batch, streams.noise)              # one batch, CRN
        g = self.estimator.estimate(losses, e, self.d_eff)
        # NOTE(paper): the reference logs the last perturbed loss L_n; the clean loss L(theta) is reported here
        return self.update(g, losses[0] if self.estimator.scheme == "forward" else losses.mean())

    def update(self, g: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """SG projection, ZO-Adam step, SG buffer push; returns ``loss``."""
        if self.sg is not None:
            g = self.sg.project(g)
        self.adam.lr = self.lr
        self.adam.step(self.theta, g)
        if self.sg is not None:
            self.sg.push(self.theta)
        return loss

    def expected_estimate(self, batch, streams: Streams) -> tuple[torch.Tensor, torch.Tensor]:
        """Study oracle, not ZOODiP: the RGE estimate's expectation over the directions on this step's batch,
        E_e[g] = grad L(theta) (/ sqrt((d_eff + n - 1) / n) with ``normalize``), by backpropagation. The same
        data, t and eps as the real estimator; what is left of ZOODiP's trajectory without its direction noise."""
        with torch.enable_grad():
            theta = self.theta.detach().clone().requires_grad_(True)
            loss = self.objective(theta[None], batch, streams.noise)[0]
            (grad,) = torch.autograd.grad(loss, theta)
        return grad / self.estimator.divisor(self.d_eff), loss.detach()

    def state_dict(self) -> dict:
        return {"theta": self.theta.clone(), "adam": self.adam.state_dict(),
                "sg": None if self.sg is None else self.sg.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.theta.copy_(state["theta"])
        self.adam.load_state_dict(state["adam"])
        if self.sg is not None:
            if state["sg"] is None:
                raise ValueError("checkpoint was written without Subspace Gradient but this run has sg = true")
            self.sg.load_state_dict(state["sg"])


@dataclass(frozen=True)
class ZoodipFastConfig(ZoodipConfig):
    """ZOODiP with its directions in the vocabulary's top-16 principal subspace (beyond the paper)."""

    vocab_directions: int = 16


class ZoodipFast(Zoodip):
    name = "zoodip-fast"
    config_class = ZoodipFastConfig
