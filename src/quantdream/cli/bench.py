"""`quantdream bench`: measurements, each configuration in a fresh subprocess."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  quantdream bench memory --arch tiny --methods zoodip,ti --steps 2 --out bench/tiny
  quantdream bench memory --arch sd15 --methods zoodip,ti --resolution 512 --steps 3 --threads 2 --out bench/sd15

Random weights (nothing is downloaded); each method runs its real training code for --steps steps.
Training VmHWM: the process high-water mark over the steps only (after setup, gc and malloc_trim), RssAnon
and RssFile apart; whole-process: the maximum over setup and training; CUDA: max allocated / reserved.
Writes OUT/memory.json and OUT/memory.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: training memory of each method (bench memory), "
                                          "finite-difference noise per dtype (bench zo-noise)",
                              description="Benchmarks that run each configuration in a fresh subprocess.")
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    m = sub.add_parser("memory", help="peak training memory, storage, s/step, UNet passes/step per method",
                       description="Peak memory of a few real training steps of each method on an architecture "
                                   "with random weights, one fresh subprocess per method.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = m.add_argument
    a("--arch", default="tiny", help="tiny (the embedded model's architecture), sd15, sd21 or sdxl (default tiny)")
    a("--methods", default="zoodip,ti", help="comma-separated methods (default zoodip,ti), or all: zoodip, "
                                             "zoodip-fast, ti, gf-ti, dreambooth, lora, qlora, peqa, tuneqdm, tuneqdm-s1, tuneqdm-s2; "
                                             "an architecture a method does not support gets a 'not implemented' row")
    a("--resolution", type=int, default=0, help="image size in px (default: native, 64 tiny / 512 sd15 / 768 sd21 / 1024 sdxl)")
    a("--steps", type=int, default=3, help="training steps measured after setup (default 3)")
    a("--weights", choices=["int8", "int4", "none", "nf4"], default=None,
      help="weight quantization of the frozen model for every method (default: as each method runs in its paper: "
           "zoodip*, gf-ti, peqa, tuneqdm* int8; ti, dreambooth, lora none; qlora nf4)")
    a("--images", type=int, default=2, help="random reference images (default 2)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0, help="torch CPU threads in each subprocess (default: torch's choice)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--low-memory", dest="low_memory", action="store_true",
      help="run each method as personalize --low-memory --set sample_images=0 does: freed blocks >= 128 KiB "
           "return to the OS at once, peft and bitsandbytes not imported unless the method uses them, "
           "torch._dynamo only if something needs it, one UNet "
           "row per call, feed-forwards 256 positions at a time, up blocks without the skip concatenation, the "
           "autoencoder freed after encoding (lower resident peak, slower steps); the default measures the "
           "methods as they come")
    a("--timeout", type=float, default=0, help="seconds per method before giving up (default: none)")
    a("--out", required=True, help="folder for memory.json and memory.md")
    z = sub.add_parser("zo-noise", help="are ZOODiP's finite differences a signal in a dtype at a mu?",
                       description="Correlation, over n random directions, of the finite differences "
                                   "(L(theta + mu e) - L(theta)) / mu with the UNet in each dtype against float64 ones "
                                   "(common random numbers: same latents, caption, t and eps), at several timesteps. "
                                   "ZO runs refuse a dtype/mu pair whose correlation falls below 0.9.")
    a = z.add_argument
    a("--model", default="tiny", help="tiny (the embedded model), sd15 / sd21 (the architecture with random "
                                      "weights) or a local diffusers folder")
    a("--dtype", default="fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16 (default all three; fp16 on a "
                                                "CPU without fp16 matrix kernels is ~50x slower than fp32)")
    a("--mu", default="1e-3,1e-2,1e-1", help="comma-separated perturbation scales (default 1e-3,1e-2,1e-1)")
    a("--n", type=int, default=16, help="random directions (default 16)")
    a("--timesteps", default="300,600,850", help="comma-separated timesteps (default 300,600,850)")
    a("--resolution", type=int, default=0, help="image size in px (default: the model's native size)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    a("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    a("--out", help="also write the table as JSON to this file")
    p.set_defaults(_parser=p)
    return p


def run_zo_noise(args) -> int:
    import torch

    from ..bench.zo_noise import NoiseSpec, zo_noise
    from ..models.load import pick_device
    args.device = pick_device(args.device)          # a CUDA device torch cannot see: one line, exit 2
    try:
        spec = NoiseSpec(model=args.model, dtypes=tuple(d.strip() for d in args.dtype.split(",") if d.strip()),
                         mus=tuple(float(m) for m in args.mu.split(",") if m.strip()), n=args.n,
                         timesteps=tuple(int(t) for t in args.timesteps.split(",") if t.strip()),
                         resolution=args.resolution, seed=args.seed, device=args.device)
    except ValueError as e:
        raise ValueError(f"--mu / --timesteps must be comma-separated numbers: {e}") from None
    if args.n < 2 or not spec.timesteps or not all(0 <= t < 1000 for t in spec.timesteps):
        raise ValueError("--n must be >= 2 and --timesteps in 0..999")
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; give a JSON file name")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = zo_noise(spec, log=lambda s: print(s, file=sys.stderr))
    result["command"] = "quantdream bench zo-noise " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "zo-noise"]
                                                                else [])
    print(f"{'dtype':6} {'mu':>7} {'corr':>6}  refused")
    for r in result["rows"]:
        print(f"{r['dtype']:6} {r['mu']:7g} {r['correlation']:6.3f}  {'no' if r['ok'] else 'yes'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def run(args) -> int:
    if getattr(args, "bench", None) == "zo-noise":
        return run_zo_noise(args)
    if getattr(args, "bench", None) != "memory":
        args._parser.print_help()
        return 2
    from ..bench.memory import ARCHS, BenchSpec, bench_memory, check_spec, memory_markdown
    if args.arch not in ARCHS:
        raise ValueError(f"--arch {args.arch!r} is not one of {', '.join(ARCHS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == ["all"]:
        from ..methods import METHODS
        methods = list(METHODS)
    if not methods:
        raise ValueError("--methods is empty; give e.g. zoodip,ti")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {args.out!r} is a file; give a folder")
    specs = [BenchSpec(arch=args.arch, method=m, resolution=args.resolution, steps=args.steps,
                       weights=args.weights or "", images=args.images, seed=args.seed, threads=args.threads,
                       device=args.device, low_memory=args.low_memory) for m in methods]
    for s in specs:
        check_spec(s)

    def show(row: dict) -> None:
        if row["status"] == "ok":
            print(f"{row['method']} ({row['weights']}): training peak {row['training_peak']['vmhwm_mib']:.0f} MiB, "
                  f"whole process {row['whole_process_peak_mib']:.0f} MiB, {row['seconds_per_step']:.3g} s/step",
                  file=sys.stderr)
        else:
            print(f"{row['method']}: {row['status']} ({row.get('note', '')})", file=sys.stderr)

    result = bench_memory(specs, timeout=args.timeout or None, callback=show)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "memory.md").write_text(memory_markdown(result))
    print(f"wrote {out / 'memory.json'} and {out / 'memory.md'}")
    return 0 if all(r["status"] != "failed" for r in result["rows"]) else 1
