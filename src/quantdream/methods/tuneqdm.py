"""TuneQDM (Ryu, Lim, Shim, "Memory-Efficient Fine-Tuning for Quantized Diffusion Model", ECCV 2024;
https://arxiv.org/abs/2401.04339, code https://github.com/ugonfor/TuneQDM): timestep-aware scale tuning of a
quantized UNet, DreamBooth loss.

    ECCV 2024 (v2), ``tuneqdm``:   W_j = diag(s_out^j) (W_q - z) diag(s_in^j)              MCSU
                                  j(t) = min(N - 1, floor(t N / T)),  T = 1000             TAS
    v1 S2, ``tuneqdm-s2``:        W_j = diag(s_out^j) (W_q - z), the same j(t)            (TAS without MCSU)
    v1 S1, ``tuneqdm-s1``:        W = diag(s_out) (W_q - z) for t in [t_lo, t_hi), frozen scales elsewhere

s_out^j starts at the quantizer scale and s_in^j at 1 (TuneQDM's code), so step 0 is the frozen model.
Training samples t ~ U{0..999} (TAS: only expert j(t) gets a gradient) or, for S1, t ~ U[t_lo, t_hi)
(outside the interval the trainable set is unused). At inference a forward pre-hook on the UNet reads
``timestep`` and picks the set (quant/timestep.py), so the same scale file drives any sampler.

S1 interval rule: [500, 1000), the high-noise half. ZOODiP's PUTS study (Fig. 4/7, Table S7) finds that
subject colour and shape are learned at high-noise timesteps while low-noise steps render details and
follow the prompt; tuning only there should keep prompt fidelity. [UNVERIFIED] TuneQDM v1's own
interval. Alternatives: ``--set tuneqdm_s1.t_low=0 --set tuneqdm_s1.t_high=500`` etc. Measured
(benchmarks/studies/tuneqdm_study.py --study interval, 2 subjects): [500, 1000) has the best subject and prompt fidelity of
[0, 500), [250, 750), [500, 900) and PEQA's every-t scales (docs/personalization.md).
N: 4 (TuneQDM's script ``--num_experts=4``, the only SD setting published); NOTE(paper): the T-note's
CIFAR-10 ablation found N=2 best; ``--set tuneqdm.num_experts=2``. Measured here: on 4 subjects
(benchmarks/studies/tuneqdm_study.py --study experts) N=2 and N=4 level; on all 10 (benchmarks/comparison.py
--refresh-methods) N=2 +0.015 world CLIP-I but -0.040 prompt accuracy, below PEQA's, so N=4 stays. N=1 renders
as PEQA, since at lr 3e-6 Adam moves s_in (init 1) by <= 5e-4 in 400 steps while s_out (~1e-3) moves by ~100%
(TuneQDM's code: the same rate and init). The scale file holds N x 0.61 M values on SD-1.5, as int8 changes
(peqa.py, quant/scales.py): 2.48 MB at N=4, the size ZOODiP's Table 1 prints (there: one float32 set).
"""
from __future__ import annotations

from dataclasses import dataclass

from .peqa import PeqaConfig, ScaleTuning


@dataclass(frozen=True)
class TuneQDMConfig(PeqaConfig):
    num_experts: int = 4              # N, TuneQDM's script
    mcsu: bool = True                 # train s_in as well (off: TAS only, the ablation row)
    lr_in: float = 0.0                # s_in's own rate; 0: lr (TuneQDM's code). Beyond the paper, see docs


@dataclass(frozen=True)
class TuneQDMS2Config(PeqaConfig):
    num_experts: int = 4              # one PEQA scale set per interval [jT/N, (j+1)T/N)


@dataclass(frozen=True)
class TuneQDMS1Config(PeqaConfig):
    t_low: int = 500                  # the interval where the trainable scales are used (and trained)
    t_high: int = 1000


class TuneQDM(ScaleTuning):
    name = "tuneqdm"
    config_class = TuneQDMConfig

    @property
    def mode(self) -> str:
        return "out_in" if self.config.mcsu else "out"

    def scale_sets(self):
        return self.config.num_experts, None

    def param_groups(self) -> list[dict]:
        if self.config.lr_in < 0 or (self.config.lr_in and not self.config.mcsu):
            raise ValueError(f"tuneqdm.lr_in = {self.config.lr_in}: use 0 (the same rate as s_out) or a positive "
                             f"rate with tuneqdm.mcsu = true (s_in is trained only with MCSU)")
        if not self.config.lr_in:
            return super().param_groups()
        from ..quant import quantized_layers
        s_in = {id(p) for _, layer in quantized_layers(self.unet) for p in (layer.s_in or [])}
        return [{"params": [p for p in self.params if id(p) not in s_in]},
                {"params": [p for p in self.params if id(p) in s_in], "lr": self.config.lr_in}]


class TuneQDMS2(ScaleTuning):
    name = "tuneqdm-s2"
    config_class = TuneQDMS2Config

    def scale_sets(self):
        return self.config.num_experts, None


class TuneQDMS1(ScaleTuning):
    name = "tuneqdm-s1"
    config_class = TuneQDMS1Config

    def scale_sets(self):
        return 1, (self.config.t_low, self.config.t_high)
