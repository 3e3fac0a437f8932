"""Peak-memory measurement (ecosystem.md, "Measuring memory honestly").

CPU: the process high-water mark ``VmHWM`` from ``/proc/self/status`` (KiB, = ``ru_maxrss``), with
``VmRSS``, ``RssAnon`` (tensors, heap) and ``RssFile`` (mapped files, e.g. mmap'd safetensors)
reported apart. ``reset_peak()`` first returns freed heap to the OS (glibc ``malloc_trim(0)``),
then writes ``5`` to ``/proc/self/clear_refs`` so the next peak covers only what follows.
CUDA: ``max_memory_allocated`` / ``max_memory_reserved`` after ``reset_peak_memory_stats``.

    reset_peak()
    ...                                   # the phase to measure
    peak()  -> {"vmhwm_mib": ..., "rss_anon_mib": ..., "cuda_max_allocated_mib": ...}

    with measure() as m:                  # the same as a context manager
        ...
    m.peak["vmhwm_mib"]
"""
from __future__ import annotations

import ctypes
import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)
MIB = 1024 * 1024
_STATUS_KEYS = {"VmHWM": "vmhwm_mib", "VmRSS": "vmrss_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib",
                "RssShmem": "rss_shmem_mib"}


def proc_status() -> dict[str, float]:
    """Current ``VmHWM``/``VmRSS``/``RssAnon``/``RssFile``/``RssShmem`` in MiB ({} off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in _STATUS_KEYS:
                    out[_STATUS_KEYS[key]] = int(val.split()[0]) / 1024  # kB -> MiB
    except OSError:
        pass
    return out


def malloc_trim() -> bool:
    """Give freed heap pages back to the OS (glibc only); False where unavailable."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _cuda():
    try:
        import torch
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except ImportError:  # pragma: no cover
        return None


def reset_peak() -> bool:
    """Start a new peak window (CPU and, if in use, CUDA). Returns False if VmHWM could not be reset."""
    gc.collect()
    malloc_trim()
    cuda = _cuda()
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        logger.debug("could not reset VmHWM (/proc/self/clear_refs not writable)")
        return False


def peak() -> dict[str, float]:
    """Peak since the last :func:`reset_peak` (or process start) plus current RSS parts, in MiB."""
    out = proc_status()
    cuda = _cuda()
    if cuda is not None:
        cuda.synchronize()
        out["cuda_max_allocated_mib"] = cuda.max_memory_allocated() / MIB
        out["cuda_max_reserved_mib"] = cuda.max_memory_reserved() / MIB
    return out


@dataclass
class Measurement:
    reset_ok: bool = False
    peak: dict = field(default_factory=dict)


@contextmanager
def measure():
    """``with measure() as m: ...`` -> ``m.peak`` holds :func:`peak` taken at the end of the block."""
    m = Measurement(reset_ok=reset_peak())
    try:
        yield m
    finally:
        m.peak = peak()


def return_freed_memory_eagerly(threshold_mib: float = 4.0) -> bool:
    """Ask glibc to serve every allocation above ``threshold_mib`` with its own mmap (and to trim
    the heap above the same size), so freed activations go back to the OS at once instead of
    staying in the heap. Lowers the resident peak of large-tensor workloads on CPU at the cost of
    page faults; process-wide, call it once at start-up. False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    n = int(threshold_mib * MIB)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, n)) and bool(libc.mallopt(M_TRIM_THRESHOLD, n))


def _chunked(forward, tokens: int, hidden_states, *args, **kwargs):
    import torch
    if hidden_states.dim() < 3 or hidden_states.shape[1] <= tokens:
        return forward(hidden_states, *args, **kwargs)
    return torch.cat([forward(h, *args, **kwargs) for h in hidden_states.split(tokens, dim=1)], dim=1)


def chunk_feed_forward(unet, tokens: int = 1024) -> int:
    """Make every transformer block's feed-forward run on at most ``tokens`` positions at a time: the
    hidden activation (4x the width, 8x with GEGLU's gate) is then never held for the whole sequence.
    Same result, lower peak at high resolution. diffusers' ``set_chunk_feed_forward`` does the same but
    needs the chunk to divide every block's sequence length; ``split`` here takes any length. Only the
    instance's ``forward`` changes, so parameter names (scale files, LoRA) stay as they were.
    Returns the number of blocks changed."""
    import functools

    from torch import nn
    n = 0
    for m in unet.modules():
        ff = getattr(m, "ff", None)
        if isinstance(ff, nn.Module) and hasattr(m, "attn1"):
            ff.forward = functools.partial(_chunked, type(ff).forward.__get__(ff), tokens)
            n += 1
    return n


LOW_MEMORY_MMAP_MIB = 0.125   # glibc serves allocations >= 128 KiB with their own mmap in low-memory mode
LOW_MEMORY_FF_TOKENS = 256    # feed-forward positions at a time
LOW_MEMORY_CHUNK_ELEMENTS = 1 << 20   # quantized weights rebuilt at once


def low_memory_allocator() -> bool:
    """Part 1 of the low-memory mode (``personalize --low-memory``, ``bench memory --low-memory``), at
    start-up: glibc serves blocks >= 128 KiB with their own mmap, so freed activations go back to the
    OS at once. False where glibc's mallopt is missing."""
    return return_freed_memory_eagerly(LOW_MEMORY_MMAP_MIB)


OPTIONAL_INTEGRATIONS = ("peft", "bitsandbytes", "scipy")


def skip_unused_integrations(needed: tuple[str, ...] = ()) -> list[str]:
    """Part 0, before diffusers is imported: diffusers imports every optional integration it finds
    installed, and peft (+71 MiB resident), bitsandbytes (+37 MiB) and scipy (+56 MiB, through
    transformers' loss modules) are imported even by runs that never use them. Those not in ``needed``
    are marked absent for this process (``sys.modules[name] = None``: ``importlib.util.find_spec`` then
    reports them missing, as on a machine without them). torch's compiler is deferred as well
    (:func:`defer_torch_compiler`).
    Returns the names hidden; nothing once diffusers or transformers is already imported."""
    import sys
    if "diffusers" in sys.modules or "transformers" in sys.modules:
        return []
    hidden = [n for n in OPTIONAL_INTEGRATIONS if n not in needed and n not in sys.modules]
    for n in hidden:
        sys.modules[n] = None
    defer_torch_compiler()
    return hidden


def defer_torch_compiler() -> bool:
    """Part 0 as well: ``torch._dynamo`` (torch's compiler front end, +25 MiB resident) is imported only
    once something needs it; diffusers and transformers import it just to decorate functions for
    ``torch.compile`` (:mod:`quantdream.deferred_compiler`). True when deferred."""
    from .deferred_compiler import install
    return install()


def low_memory_unet(unet) -> None:
    """The UNet part of the low-memory mode: feed-forwards run 256 positions at a time, quantized
    layers rebuild 1M weights at a time (4 MiB in fp32, not 32) and no-grad up blocks never build the
    skip concatenation (:mod:`quantdream.models.lean_up`): the same outputs up to float rounding, a lower
    transient."""
    from .models.lean_up import lean_up_blocks
    from .quant.modules import QuantizedLayer
    chunk_feed_forward(unet, LOW_MEMORY_FF_TOKENS)
    lean_up_blocks(unet)
    for m in unet.modules():
        if isinstance(m, QuantizedLayer):
            m.chunk_elements = LOW_MEMORY_CHUNK_ELEMENTS


def low_memory_objective(objective) -> None:
    """Part 2, on a built :class:`~quantdream.methods.base.DenoisingObjective`: the UNet runs one row
    at a time instead of the clean and perturbed rows together (same inputs and common random numbers,
    so the same estimate up to float rounding), plus :func:`low_memory_unet`. Slower per step (less
    batching, page faults); the point is the resident peak."""
    objective.unet_batch = 1
    low_memory_unet(objective.unet)


def drop_vae_parts(vae, decoder: bool = False) -> None:
    """Part 3, once the photos are encoded and the method is set up: free the autoencoder's encoder, and
    its decoder too when the run draws no sample grids (``--set sample_images=0``). Using a freed part
    raises a clear error."""
    from .quant.io import DroppedModule
    why = {"encoder": "was freed by the low-memory mode after the photos were encoded; run without "
                      "--low-memory to encode more",
           "decoder": "was freed by the low-memory mode: the run draws no sample grids (sample_images=0)"}
    parts = {"encoder": "encoder", "quant_conv": "encoder"}
    if decoder:
        parts.update({"decoder": "decoder", "post_quant_conv": "decoder"})
    for name, kind in parts.items():
        if getattr(vae, name, None) is not None:
            setattr(vae, name, DroppedModule(f"vae.{name}", why[kind]))
    malloc_trim()
