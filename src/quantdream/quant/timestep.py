"""Which scale set a forward uses: TuneQDM's timestep experts (TAS / S2) and the S1 interval.

TAS (methods.md §2.3): N scale sets; a UNet call at diffusion timestep ``t`` uses set::

    j = min(N - 1, floor(t * N / T)),   T = num_train_timesteps (1000)

S1 (TuneQDM v1): one trainable set used only for ``t`` in ``[t_lo, t_hi)``; elsewhere the frozen
quantizer scales (index ``None``).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ScaleSelector:
    """Shared by every quantized layer of a model; ``current`` is the set the next forward uses."""

    def __init__(self, num_experts: int = 1, num_train_timesteps: int = 1000,
                 interval: tuple[float, float] | None = None):
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        if interval is not None:
            if num_experts != 1:
                raise ValueError(f"interval={interval} (TuneQDM S1) uses one trainable scale set; "
                                 f"got num_experts={num_experts}")
            t_lo, t_hi = interval
            if not 0 <= t_lo < t_hi <= num_train_timesteps:
                raise ValueError(f"interval must satisfy 0 <= t_lo < t_hi <= {num_train_timesteps}, got {interval}")
            interval = (float(t_lo), float(t_hi))
        self.num_experts = num_experts
        self.num_train_timesteps = num_train_timesteps
        self.interval = interval
        self.current: int | None = 0

    def index_for(self, t: float) -> int | None:
        """Expert index for timestep ``t``; ``None`` means the frozen scales (outside the S1 interval)."""
        if self.interval is not None:
            return 0 if self.interval[0] <= t < self.interval[1] else None
        return min(self.num_experts - 1, max(0, math.floor(t * self.num_experts / self.num_train_timesteps)))

    def set_timestep(self, timestep) -> int | None:
        """Select the set for ``timestep`` (number, 0-d or 1-d tensor); every entry must agree."""
        if torch.is_tensor(timestep):
            ts = timestep.detach().reshape(-1).tolist()
        elif isinstance(timestep, (list, tuple)):
            ts = list(timestep)
        else:
            ts = [timestep]
        if not ts:
            raise ValueError("empty timestep tensor: cannot pick a scale set")
        idx = {self.index_for(float(t)) for t in ts}
        if len(idx) > 1:
            raise ValueError(f"the batch mixes timesteps {sorted(set(ts))} that use different scale sets {idx}; "
                             "run one forward per scale set (TuneQDM assumes one timestep per call)")
        self.current = idx.pop()
        return self.current

    def set_expert(self, j: int | None) -> None:
        if j is not None and not 0 <= j < self.num_experts:
            raise ValueError(f"expert {j} out of range: this model has {self.num_experts} scale set(s)")
        self.current = j

    def attach(self, module: nn.Module):
        """Forward pre-hook that reads ``timestep`` (kwarg or 2nd positional, as in
        ``UNet2DConditionModel.forward(sample, timestep, ...)``) and selects the set. Returns the handle."""
        def hook(mod, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if t is None:
                raise ValueError(f"{type(mod).__name__} was called without a timestep, so the scale set cannot "
                                 "be chosen; pass timestep= or call ScaleSelector.set_expert() and attach no hook")
            self.set_timestep(t)
        return module.register_forward_pre_hook(hook, with_kwargs=True)

    def __repr__(self) -> str:
        extra = f", interval={self.interval}" if self.interval else ""
        return f"ScaleSelector(num_experts={self.num_experts}{extra}, current={self.current})"
