"""The memory bar of personalization (ZOODiP at 4x below textual inversion). Prints one JSON object.

    python benchmarks/personalization_memory.py                     # sd15, 512 px, 2 steps, zoodip + ti
    python benchmarks/personalization_memory.py --arch tiny --steps 2   # a quick look

ZOODiP (int8 UNet, VAE and text encoder) and textual inversion (fp32) on the SD-1.5 architecture with
random weights, each in a fresh subprocess (``quantdream bench memory``). Bars: ZOODiP's whole-process
peak <= 1.5 GB (1536 MiB), and fp32 TI's whole-process peak >= 4x ZOODiP's, in the same run.
Heavy on CPU: an SD-1.5 fp32 TI step at 512 px takes about a minute and ~10 GB.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--low-memory", dest="low_memory", action="store_true")
    ap.add_argument("--limit-mib", dest="limit_mib", type=float, default=1536.0)
    ap.add_argument("--ratio", type=float, default=4.0)
    a = ap.parse_args(argv)
    from quantdream.bench.memory import BenchSpec, bench_memory
    specs = [BenchSpec(arch=a.arch, method=m, resolution=a.resolution if a.arch != "tiny" else 0, steps=a.steps,
                       threads=a.threads, low_memory=a.low_memory) for m in ("zoodip", "ti")]
    result = bench_memory(specs)
    rows = {r["method"]: r for r in result["rows"]}
    bars = {}
    z, t = rows["zoodip"], rows["ti"]
    if z["status"] == "ok":
        bars["zoodip_whole_process_mib"] = z["whole_process_peak_mib"]
        bars["zoodip_whole_process_le_limit"] = z["whole_process_peak_mib"] <= a.limit_mib
        bars["zoodip_training_peak_mib"] = z["training_peak"]["vmhwm_mib"]
    if z["status"] == "ok" and t["status"] == "ok":
        r = t["whole_process_peak_mib"] / z["whole_process_peak_mib"]
        bars["ti_over_zoodip_whole_process"] = r
        bars["ti_over_zoodip_ge_ratio"] = r >= a.ratio
        bars["ti_over_zoodip_training_peak"] = t["training_peak"]["vmhwm_mib"] / z["training_peak"]["vmhwm_mib"]
    print(json.dumps({"arch": a.arch, "resolution": a.resolution, "limit_mib": a.limit_mib, "ratio": a.ratio,
                      "bars": bars, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
