"""Textual inversion (Gal et al. 2023), the gradient reference: backpropagation through the frozen
(float or quantized) text encoder and UNet to the token rows only.

    theta* = argmin_theta E || eps - eps_phi(z_t, t, c(y; theta)) ||^2,   theta <- AdamW(theta, dL/dtheta)

Only theta (num_vectors, d) is a leaf with requires_grad; the embedding table is not handed to the
optimizer (the diffusers script trains the whole table and copies the other rows back).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import puts, uniform
from .base import DenoisingObjective, Method, Streams


@dataclass(frozen=True)
class TIConfig:
    lr: float = 5e-3             # ZOODiP §S1.5 trains its TI baseline at 5e-3 for 5,000 steps
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0    # the diffusers script decays the whole table at 1e-2; off for one row
    puts: bool = False           # Table S7: PUTS also helps TI; off to match the standard baseline
    t_low: int = 500
    t_high: int = 900


class TextualInversion(Method):
    name = "ti"
    config_class = TIConfig
    default_weights = "none"   # the gradient reference, unquantized as in ZOODiP Table 1 (--weights int8 works too)

    def __init__(self, objective: DenoisingObjective, theta0: torch.Tensor, config: TIConfig = TIConfig()) -> None:
        super().__init__(objective, theta0, config)
        objective.set_timesteps(puts(config.t_low, config.t_high) if config.puts
                                else uniform(objective.num_train_timesteps))
        self.theta.requires_grad_(True)
        self.opt = torch.optim.AdamW([self.theta], lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                     weight_decay=config.weight_decay)

    def step(self, batch, streams: Streams) -> torch.Tensor:
        loss = self.objective(self.theta[None], batch, streams.noise)[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"theta": self.theta.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.opt.load_state_dict(state["opt"])
