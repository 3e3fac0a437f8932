"""The time plan: what a run will cost before step 0, from a few measured warm-up steps.

    s/step   = the mean of ``timed`` real steps after one untimed step (state, optimizer and streams restored
               afterwards, so the run's trajectory is the same with or without the plan)
    ETA      = remaining steps x s/step  +  sample grids x grid passes x s/pass              (the bar uses it too)
    s/pass   = s/step / UNet passes per step          (one sample's forward pass; all ranks' passes count)
    peak     = the process high-water mark (VmHWM) after the warm-up (setup + steps), CUDA max allocated

Weight methods (DreamBooth, LoRA, PEQA, TuneQDM) are not stepped (their state is the UNet or an adapter; a
copy would double the memory): their s/step is the objective's forward time x 3 (forward + backward), labelled
an estimate. ``personalize --dry-run`` prints the plan and writes nothing; ``--max-hours H`` refuses a run whose
ETA exceeds H hours, naming the levers.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

from . import memory as memory_mod

BACKWARD_FACTOR = 3.0   # forward + backward of a weight method, in forward passes (estimate)


@dataclass
class TimePlan:
    method: str
    steps: int                  # steps still to run
    passes_per_step: float      # UNet passes of one sample per step, all ranks together
    seconds_per_step: float
    ranks: int = 1
    measured: bool = True       # False: the weight-method estimate (forward x 3)
    grid_passes: int = 0        # UNet passes of all sample grids still to draw
    peak_mib: float = 0.0       # whole-process VmHWM after the warm-up (per rank)
    cuda_peak_mib: float = 0.0

    @property
    def passes(self) -> float:
        return self.steps * self.passes_per_step

    @property
    def seconds_per_pass(self) -> float:
        """Wall seconds per UNet pass of the whole run (R ranks share a step's passes)."""
        return self.seconds_per_step / max(self.passes_per_step, 1e-9)

    def eta(self, done: int = 0, seconds_per_step: float | None = None) -> float:
        """Seconds left after ``done`` of ``steps`` steps (with this run's measured s/step when given)."""
        sps = self.seconds_per_step if seconds_per_step is None else seconds_per_step
        grids = self.grid_passes * self.seconds_per_pass * self.ranks   # grids run on rank 0 alone
        return max(0, self.steps - done) * sps + grids * (1 - done / max(1, self.steps))

    @property
    def training_seconds(self) -> float:
        return self.steps * self.seconds_per_step

    def text(self) -> str:
        how = "measured" if self.measured else f"estimated: forward x {BACKWARD_FACTOR:g}"
        mem = f", peak memory {self.peak_mib:.0f} MiB per process" if self.peak_mib else ""
        mem += f" (CUDA {self.cuda_peak_mib:.0f} MiB)" if self.cuda_peak_mib else ""
        ranks = f" on {self.ranks} processes" if self.ranks > 1 else ""
        return (f"time plan: {self.method}, {self.steps} steps x {self.passes_per_step:g} UNet passes = "
                f"{self.passes:,.0f} passes{ranks}; {self.seconds_per_step:.3g} s/step ({how}), "
                f"{self.seconds_per_pass:.3g} s/pass; ETA {duration(self.eta())}{mem}")

    def to_dict(self) -> dict:
        return {**asdict(self), "passes": self.passes, "seconds_per_pass": self.seconds_per_pass,
                "eta_seconds": self.eta(), "training_seconds": self.training_seconds}

    def check(self, max_hours: float) -> None:
        """Refuse a run predicted to take longer than ``max_hours`` (0: no limit)."""
        if not max_hours or self.eta() <= max_hours * 3600:
            return
        fit = int(max(0.0, max_hours * 3600 - (self.eta() - self.training_seconds)) / self.seconds_per_step)
        raise ValueError(f"--max-hours {max_hours:g}: this run needs about {duration(self.eta())} "
                         f"({self.steps} steps x {self.seconds_per_step:.3g} s); use fewer --steps (about {fit} fit), "
                         f"--method zoodip-fast (1/3 of zoodip's UNet passes on SD, 1/9 on the embedded model), "
                         f"or more processes with --nproc K (each evaluates 1/K of a step's candidates)")


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s / 86400:.1f} days"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _forward_seconds(objective, method, data, streams, placeholder, batch_size: int, repeats: int) -> float:
    """Weight methods: seconds of one forward of the objective on one candidate (generators restored)."""
    state = streams.state_dict()
    theta = method.theta.detach()[None]
    objective(theta, data.sample(batch_size, streams.data, placeholder.text), streams.noise)   # untimed
    t0 = time.perf_counter()
    for _ in range(repeats):
        objective(theta, data.sample(batch_size, streams.data, placeholder.text), streams.noise)
    _sync(objective.device)
    streams.load_state_dict(state)
    return (time.perf_counter() - t0) / repeats


def warm_up(method, objective, data, streams, placeholder, batch_size: int, timed: int = 3,
            agree=lambda x: x) -> tuple[float, float, bool]:
    """(s/step, UNet passes per step, measured) from one untimed and up to ``timed`` real steps; the method's
    state, the random streams and the pass counter are put back afterwards. ``agree`` makes every rank use the
    same number (the largest): ranks must take the same number of steps."""
    passes0 = objective.forward_passes
    if method.kind != "token":
        rows = batch_size
        sps = _forward_seconds(objective, method, data, streams, placeholder, batch_size, 1) * BACKWARD_FACTOR
        objective.forward_passes = passes0
        return agree(sps), float(rows), False
    saved = copy.deepcopy(method.state_dict()), streams.state_dict()

    def one() -> None:
        float(method.step(data.sample(batch_size, streams.data, placeholder.text), streams))   # float(): sync

    t0 = time.perf_counter()
    one()                                                   # first step: lazy init, caches, kernel selection
    first = agree(time.perf_counter() - t0)
    n = max(1, min(timed, 3 if first < 5 else 1))
    p0 = objective.forward_passes
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    sps = agree((time.perf_counter() - t0) / n)
    per_step = (objective.forward_passes - p0) / n
    method.load_state_dict(saved[0])
    streams.load_state_dict(saved[1])
    objective.forward_passes = passes0
    return sps, per_step, True


def grid_passes(steps_left: int, done: int, sample_every: int, sample_images: int, sample_steps: int,
                prompts: int) -> int:
    """UNet passes (rows) of the sample grids still to draw: every ``sample_every`` steps and the final one."""
    if not sample_images:
        return 0
    end = done + steps_left
    grids = 1 + (len(range(done + sample_every, end, sample_every)) if sample_every else 0)
    return grids * sample_steps * 2 * prompts * sample_images


def measure(method, objective, data, streams, placeholder, *, name: str, steps_left: int, done: int, cfg,
            ranks: int = 1, agree=lambda x: x) -> TimePlan:
    """The plan of a run about to start (``cfg``: train.RunConfig)."""
    sps, per_step, measured = warm_up(method, objective, data, streams, placeholder, cfg.batch_size,
                                      timed=min(3, max(1, steps_left)), agree=agree)
    peak = memory_mod.peak()
    return TimePlan(method=name, steps=steps_left, passes_per_step=per_step, seconds_per_step=sps, ranks=ranks,
                    measured=measured, grid_passes=grid_passes(steps_left, done, cfg.sample_every,
                                                               cfg.sample_images, cfg.sample_steps,
                                                               len(cfg.sample_prompts)),
                    peak_mib=peak.get("vmhwm_mib", 0.0), cuda_peak_mib=peak.get("cuda_max_allocated_mib", 0.0))
