"""Precision guard: is a finite difference at scale mu still a signal in this activation dtype?

ZOODiP's projected gradient p_i = (L(theta + mu e_i) - L(theta)) / mu subtracts two losses that differ by
about mu |grad L . e_i|. In a narrow dtype the UNet's rounding noise on each loss does not shrink with mu,
so below some mu the differences are rounding noise. ``bench.zo_noise.zo_noise`` measures it on a model: the Pearson
correlation, over n directions, of p_i computed with the UNet in the dtype (the text encoder in float32: the
objective splices the token rows in float32) with p_i computed in float64 throughout, on the same float32
candidates, latents, caption, t and eps (common random numbers), at several timesteps. Weights unquantized.

``check_zo_precision`` refuses a ZO run whose (dtype, mu) fell below ``MIN_CORRELATION`` on the committed
tables (benchmarks/results/2026-12-04/zo_noise_embedded.json and zo_noise_sd15.json, ``quantdream bench
zo-noise``, CPU): ``MIN_MU``, the worst case of the two models measured.
"""
from __future__ import annotations

import logging

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_CORRELATION = 0.9
# The smallest mu (of 1e-3, 1e-2, 1e-1) whose finite differences correlate >= MIN_CORRELATION with float64 ones on
# every model measured. bfloat16: embedded model 0.39 / 0.39 / 0.94, SD-1.5 architecture (random weights, 64 px)
# 0.79 / 0.995 / 1.000 -> 1e-1. float16: embedded model 0.39 / 0.97 / 0.998 -> 1e-2 (SD-1.5 not measured: fp16
# matrix products on the CPU used are ~50x slower than fp32).
MIN_MU = {torch.float32: 0.0, torch.float16: 1e-2, torch.bfloat16: 1e-1}


def check_zo_precision(method: str, config, dtype: torch.dtype, explicit: bool = True) -> torch.dtype:
    """The dtype a zeroth-order run (a config with ``mu``) may use: ``dtype`` when its finite differences at
    mu are a signal; float32 when the dtype was only the device's default (``explicit=False``: --dtype auto,
    float16 on CUDA); otherwise a refusal that says what to use."""
    mu = getattr(config, "mu", None)
    low = MIN_MU.get(dtype, 0.0)
    if mu is None or mu >= low:
        return dtype
    if not explicit:
        logging.getLogger(__name__).info("%s: mu = %g needs float32 activations here (--dtype auto would pick %s)",
                                         method, mu, str(dtype).replace("torch.", ""))
        return torch.float32
    name = str(dtype).replace("torch.", "")
    sec = method.replace("-", "_")
    raise ValueError(f"{method}: {sec}.mu = {mu:g} in {name}: the finite differences are mostly rounding noise "
                     f"(correlation with float64 below {MIN_CORRELATION}, `quantdream bench zo-noise`); use "
                     f"--dtype float32, or --set {sec}.mu={low:g} (measure your model: quantdream bench zo-noise "
                     f"--model M --dtype {name} --mu {mu:g})")
