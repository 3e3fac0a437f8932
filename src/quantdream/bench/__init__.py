"""Benchmarks behind ``quantdream bench``: each configuration runs in a fresh subprocess.

    from quantdream.bench import BenchSpec, bench_memory, memory_markdown
    rows = bench_memory([BenchSpec(arch="tiny", method=m, steps=2) for m in ("zoodip", "ti")])
"""
from .memory import (BENCH_METHODS, KNOWN_METHODS, BenchMethod, BenchSpec, bench_memory, measure_in_process,
                     memory_markdown, register_bench_method, run_in_subprocess)

__all__ = ["BENCH_METHODS", "KNOWN_METHODS", "BenchMethod", "BenchSpec", "bench_memory", "measure_in_process",
           "memory_markdown", "register_bench_method", "run_in_subprocess"]
