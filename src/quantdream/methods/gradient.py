"""The DreamBooth-loss gradient loop shared by every method that adapts the UNet (dreambooth, lora,
qlora, peqa, tuneqdm, tuneqdm-s1, tuneqdm-s2):

    L(phi) = E_{x, eps, t} || eps - eps_phi(z_t, t, c("a photo of sks <class>")) ||^2  (+ method's extra term)
    phi <- AdamW(phi, dL/dphi)          phi: only what the method declares (``self.params``)

The frozen model (float, quantized or 4-bit) is the objective's UNet; a subclass decides which of its
tensors are trainable (``make_trainable``), may add a loss term (``extra_loss``: DreamBooth's prior
preservation) and writes its own output (``export``). Everything else (data, captions, timesteps,
noise, checkpoints, Ctrl-C, run.json) is the scaffold's (train.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_json
from ..diffusion import TimestepSampler, uniform
from .base import DenoisingObjective, Method, Streams


@dataclass(frozen=True)
class GradientConfig:
    """AdamW settings of the HF DreamBooth script (methods.md 1.11 baseline table)."""

    lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2       # diffusers train_dreambooth.py --adam_weight_decay default
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0       # diffusers scripts clip at 1.0; 0 turns clipping off
    t_low: int = 0                   # training timesteps t ~ U{t_low, ..., t_high - 1}
    t_high: int = 1000               # (ZOODiP Table S7 also tried PUTS, [500, 900), on DreamBooth)


class GradientMethod(Method):
    """Adapts the UNet by backpropagation; theta is empty (0, d) (no new token)."""

    kind = "weights"
    default_weights = "none"
    weight_choices: tuple[str, ...] = ("none",)
    instance_prompt = "a photo of {}"        # {} -> "sks <class>" (DreamBooth's "a photo of sks dog")

    def __init__(self, objective: DenoisingObjective, theta0: torch.Tensor, config: GradientConfig) -> None:
        super().__init__(objective, theta0[:0], config)
        self.unet = objective.unet
        objective.set_timesteps(self.timestep_sampler())
        self.params: list[torch.nn.Parameter] = self.make_trainable(self.unet)
        if not self.params:
            raise ValueError(f"{self.name}: no trainable parameters were created")
        self.opt = torch.optim.AdamW(self.param_groups(), lr=config.lr, betas=tuple(config.betas),
                                     eps=config.adam_eps, weight_decay=config.weight_decay)
        self.identifier = ""                     # set by setup() from the run: "sks bag"

    # -- what a subclass provides
    def make_trainable(self, unet) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups: one, at ``config.lr`` (a subclass may give some tensors their own rate)."""
        return [{"params": self.params}]

    def timestep_sampler(self) -> TimestepSampler:
        c = self.config
        return uniform(self.objective.num_train_timesteps) if (c.t_low, c.t_high) == (0, 1000) \
            else TimestepSampler(c.t_low, c.t_high)

    def extra_loss(self, batch, streams: Streams) -> torch.Tensor | None:
        return None

    def export_files(self, out: Path) -> list[Path]:
        raise NotImplementedError

    # -- the shared loop body
    def setup(self, ctx) -> None:
        self.identifier = ctx.placeholder.text

    def trainable_parameters(self) -> list[torch.Tensor]:
        return list(self.params)

    def step(self, batch, streams: Streams) -> torch.Tensor:
        loss = self.objective(self.theta[None], batch, streams.noise)[0]        # instance loss, (K=1,) -> ()
        extra = self.extra_loss(batch, streams)
        total = loss if extra is None else loss + extra
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.opt.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"params": [p.detach().clone() for p in self.params], "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"checkpoint holds {len(state['params'])} trainable tensors, this {self.name} run "
                             f"has {len(self.params)}; use the same settings or a new --out")
        with torch.no_grad():
            for p, v in zip(self.params, state["params"]):
                p.copy_(v)
        self.opt.load_state_dict(state["opt"])

    def snapshot(self, folder, step: int, token: str) -> None:
        self.export_files(Path(folder) / f"step_{step:06d}")

    def export(self, out, token: str, step: int, a1111: bool = False) -> list[Path]:
        out = Path(out)
        files = self.export_files(out)
        info = {"method": self.name, "files": [f.name for f in files], "prompt_text": self.identifier,
                **self.adapter_info(), "config": asdict(self.config)}
        atomic_json(out / ADAPTER_JSON, json.loads(json.dumps(info, default=str)))
        return files + [out / ADAPTER_JSON]

    def adapter_info(self) -> dict:
        """What ``quantdream generate --adapter`` needs besides the files (kind, quantization)."""
        return {}

    def summary(self) -> dict:
        return {"trainable_tensors": len(self.params)}


ADAPTER_JSON = "adapter.json"
