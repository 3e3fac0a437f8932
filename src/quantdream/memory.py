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
