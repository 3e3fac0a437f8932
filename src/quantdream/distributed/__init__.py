"""ZOODiP across processes with torch.distributed, no DDP: share seeds, all-gather only the losses.

One step of a K-candidate method (ZOODiP's n + 1 tokens, GF-TI's CMA-ES population of lambda) on R ranks:

    every rank:  batch, t, eps, e_1..e_n (or Q_1..Q_lambda)  <- the same seeded streams  (nothing sent)
    rank r:      L_k for k in its share [lo_r, hi_r) of the K candidates                 (K / R forward passes)
    all ranks:   all_gather(L_lo..L_hi) -> L_0..L_{K-1}                                  (R * ceil(K / R) floats)
    every rank:  g = RGE(L, e); theta <- ZOAdam(theta, g)  (or CMA-ES tell)             (the same update)

So a step sends R * ceil(K / R) * 4 bytes per rank plus 4 bytes for the Ctrl-C flag, and every rank holds
the same theta, optimizer state and generator states after each step: rank 0 alone writes the output folder,
and any rank's checkpoint would resume the same run. The candidates a rank evaluates go through the text
encoder and the UNet as one batch, as in one process; with kernels that do not depend on the batch size
(checked for the embedded model on CPU: a 5 + 4 split gives the 9-row batch's losses bit for bit) the token
equals the single-process token bit for bit (benchmarks/distributed.py).

Launch: ``torchrun --nproc-per-node R -m quantdream personalize ...`` (multi-node: torchrun's usual
``--nnodes/--node-rank/--rdzv-endpoint``), or ``quantdream personalize --nproc R ...`` which starts R local
ranks with torch.distributed.run. gloo on CPU, NCCL on CUDA (rank r on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..diffusion import draw_noise
from ..methods.base import DenoisingObjective

DISTRIBUTED_METHODS = ("zoodip", "zoodip-fast", "gf-ti")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank, world size, local rank (from torchrun's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes checkpoints and outputs."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> Ranks:
    """The ranks torchrun (or ``--nproc``) started this process with; one process when there is none."""
    return Ranks.from_env()


def check_method(method: str, config, ranks: Ranks) -> None:
    """Only the methods whose step is 'evaluate K candidates, update from K losses' split across ranks."""
    if not ranks.distributed:
        return
    if method not in DISTRIBUTED_METHODS:
        raise ValueError(f"--method {method} does not run across processes (it backpropagates); use one process, "
                         f"or one of {', '.join(DISTRIBUTED_METHODS)} with --nproc / torchrun")
    if getattr(config, "estimator", "rge") != "rge":
        raise ValueError("zoodip.estimator = 'expected' (the study oracle) backpropagates; run it in one process")


def init(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns this rank's device."""
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank,
                                world_size=ranks.world)
    return device


def close() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def share(K: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s candidates [lo, hi) of K: contiguous, sizes differ by at most one, lower ranks first."""
    base, extra = divmod(K, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class ShardedObjective(DenoisingObjective):
    """L(theta) for K candidates of which this rank evaluates its share; the losses of all K come back
    from one all-gather. The step's (t, eps) is drawn from ``generator`` on every rank, so the generator
    advances exactly as in one process. ``forward_passes`` counts every rank's passes (what the run cost,
    the same number on every rank and in a checkpoint as in one process)."""

    def __init__(self, *args, ranks: Ranks, **kw) -> None:
        super().__init__(*args, **kw)
        self.ranks = ranks
        self.bytes_sent = 0        # all-gather payload this rank contributed, bytes

    def __call__(self, theta: torch.Tensor, batch, generator: torch.Generator) -> torch.Tensor:
        import torch.distributed as dist
        if theta.dim() == 2:
            theta = theta[None]
        K, R = theta.shape[0], self.ranks.world
        lo, hi = share(K, self.ranks.rank, R)
        width = -(-K // R)                                         # ceil(K / R): all-gather needs one size
        mine = torch.full((width,), float("nan"), device=self.device)
        if hi > lo:
            mine[: hi - lo] = super().__call__(theta[lo:hi], batch, generator).float()
        else:                                                      # nothing to evaluate: keep the stream in step
            draw_noise(tuple(batch.latents.shape), self.timesteps, generator)
        self.forward_passes += (K - (hi - lo)) * batch.latents.shape[0]   # the other ranks' passes
        parts = [torch.empty_like(mine) for _ in range(R)]
        dist.all_gather(parts, mine)
        self.bytes_sent += mine.numel() * mine.element_size()
        return torch.cat([p[: share(K, r, R)[1] - share(K, r, R)[0]] for r, p in enumerate(parts)])


def sharded(objective: DenoisingObjective, ranks: Ranks) -> DenoisingObjective:
    """``objective`` evaluating this rank's share of every call (itself, when there is one process)."""
    if not ranks.distributed:
        return objective
    objective.__class__ = ShardedObjective
    objective.ranks, objective.bytes_sent = ranks, 0
    return objective


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on one (Ctrl-C reaches ranks at different steps)."""
    if not ranks.distributed:
        return flag
    import torch.distributed as dist
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: float, ranks: Ranks, device: torch.device) -> float:
    """The largest ``value`` of all ranks (every rank then takes the same decision from it)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def launch(nproc: int, argv: list[str]) -> int:
    """``quantdream personalize --nproc R ...``: start R local ranks of the same command (torchrun's
    ``--standalone`` rendezvous); returns 0 when every rank finished, else the launcher's failure as 1."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module",
                                         "quantdream", *argv])
    try:
        run(args)
    except Exception as e:  # torch.distributed.elastic's ChildFailedError: each rank's error is on stderr
        import sys
        print(f"quantdream: {nproc} ranks did not all finish ({type(e).__name__}); see the ranks' errors above",
              file=sys.stderr)
        return 1
    return 0
