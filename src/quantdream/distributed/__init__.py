"""ZOODiP across processes with torch.distributed, no DDP: share seeds, all-gather only the losses.

One step of a K-candidate method (ZOODiP's n + 1 tokens, GF-TI's CMA-ES population of lambda) on R ranks:

    every rank:  batch, t, eps, e_1..e_n (or Q_1..Q_lambda)  <- the same seeded streams  (nothing sent)
    rank r:      L_k for k in its share [lo_r, hi_r) of the K candidates                 (K / R forward passes)
    all ranks:   all_gather(L_lo..L_hi) -> L_0..L_{K-1}                                  (R * ceil(K / R) floats)
    every rank:  g = RGE(L, e); theta <- ZOAdam(theta, g)  (or CMA-ES tell)             (the same update)

So a step sends R * ceil(K / R) * 4 bytes per rank plus 4 bytes for the Ctrl-C flag, and every rank holds
the same theta, optimizer state and generator states after each step: rank 0 alone writes the output folder,
and any rank's checkpoint would resume the same run. The candidates of a shard go through the text encoder
and the UNet as one batch. The token of R ranks equals, bit for bit, the token of one process run with
``--set candidate_shards=R`` (the same batches, evaluated one after the other); against one process with one
batch of all K it agrees up to the kernels' batch-size-dependent rounding (1 ulp of a loss), which a ZO
trajectory then carries on (benchmarks/distributed.py measures both).

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


def check_method(method: str, config, ranks: Ranks, shards: int = 0) -> None:
    """Only the methods whose step is 'evaluate K candidates, update from K losses' split across ranks."""
    if not ranks.distributed and shards <= 1:
        return
    if method not in DISTRIBUTED_METHODS:
        raise ValueError(f"--method {method} does not run across processes or candidate shards (it backpropagates); "
                         f"use one process, or one of {', '.join(DISTRIBUTED_METHODS)}")
    if getattr(config, "estimator", "rge") != "rge":
        raise ValueError("zoodip.estimator = 'expected' (the study oracle) backpropagates; run it in one process")


def scaled(method: str, config, ranks: Ranks):
    """``scale_candidates``: R ranks evaluate R times the candidates in the time one process takes for its
    own, so ZOODiP draws n R directions a step (GF-TI: a population of lambda R)."""
    import dataclasses
    if not ranks.distributed:
        return config
    if method == "gf-ti":
        return dataclasses.replace(config, popsize=config.popsize * ranks.world)
    return dataclasses.replace(config, n=config.n * ranks.world)


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
    """L(theta) for K candidates split into S contiguous shards (``share(K, s, S)``); rank r evaluates the
    shards ``share(S, r, R)``, each as one batch, and the losses of all K come back from one all-gather.

    Each shard draws the step's (t, eps) from the same generator state, and the generator ends one draw
    further, as in one process. Why shards and not "the rows this rank has": CPU and GPU kernels may round
    a row differently in batches of different sizes (seen: 1 ulp of a loss between a 3-row batch and a 2 + 1
    split), so bit-identity holds between runs with the same shards: R ranks (S = R by default) and one
    process with ``candidate_shards = R``. ``forward_passes`` counts every rank's passes (what the run cost,
    the same on every rank and in a checkpoint as in one process)."""

    def __init__(self, *args, ranks: Ranks, shards: int = 0, **kw) -> None:
        super().__init__(*args, **kw)
        self.ranks, self.shards, self.bytes_sent = ranks, shards or ranks.world, 0

    def _shard_rows(self, K: int, rank: int) -> list[tuple[int, int]]:
        a, b = share(self.shards, rank, self.ranks.world)
        return [share(K, s, self.shards) for s in range(a, b)]

    def __call__(self, theta: torch.Tensor, batch, generator: torch.Generator) -> torch.Tensor:
        if theta.dim() == 2:
            theta = theta[None]
        K, R = theta.shape[0], self.ranks.world
        counts = [sum(hi - lo for lo, hi in self._shard_rows(K, r)) for r in range(R)]
        mine = torch.full((max(counts),), float("nan"), device=self.device)
        start, i = generator.get_state(), 0
        for lo, hi in self._shard_rows(K, self.ranks.rank):
            if hi > lo:
                generator.set_state(start)                        # every shard sees the step's one (t, eps)
                mine[i: i + hi - lo] = super().__call__(theta[lo:hi], batch, generator).float()
                i += hi - lo
        if i == 0:                                                 # nothing to evaluate: keep the stream in step
            draw_noise(tuple(batch.latents.shape), self.timesteps, generator)
        self.forward_passes += (K - i) * batch.latents.shape[0]   # the other ranks' passes
        if R == 1:
            return mine
        import torch.distributed as dist
        parts = [torch.empty_like(mine) for _ in range(R)]
        dist.all_gather(parts, mine)
        self.bytes_sent += mine.numel() * mine.element_size()
        return torch.cat([p[:c] for p, c in zip(parts, counts)])


def sharded(objective: DenoisingObjective, ranks: Ranks, shards: int = 0) -> DenoisingObjective:
    """``objective`` evaluating this rank's shards of every call (itself: one process, one shard)."""
    if shards < 0:
        raise ValueError(f"candidate_shards must be >= 0 (0: one per process), got {shards}")
    if not ranks.distributed and shards <= 1:
        return objective
    objective.__class__ = ShardedObjective        # the same object, so methods and hooks keep their references
    objective.ranks, objective.shards, objective.bytes_sent = ranks, shards or ranks.world, 0
    return objective


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on one (Ctrl-C reaches ranks at different steps)."""
    if not ranks.distributed:
        return flag
    import torch.distributed as dist
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


FLAG_BYTES = 4   # any_rank's int32 a step


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
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module",
                                         "quantdream", *argv])
    try:
        run(args)
    except SignalException:   # Ctrl-C / SIGTERM: the launcher passed SIGTERM on; the ranks stopped and rank 0 saved
        print("interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    except Exception as e:  # torch.distributed.elastic's ChildFailedError: each rank's error is on stderr
        print(f"quantdream: {nproc} ranks did not all finish ({type(e).__name__}); see the ranks' errors above",
              file=sys.stderr)
        return 1
    return 0
