"""Peak memory of personalize's sample grids against a ZOODiP step, on the SD-1.5 architecture (random
weights, int8 UNet, VAE and text encoder: ZOODiP's setting), one process per mode.

    python benchmarks/sample_grid_memory.py --resolution 256 --sample-steps 2 --mode batched
    python benchmarks/sample_grid_memory.py --resolution 256 --sample-steps 2 --mode one-at-a-time
    python benchmarks/sample_grid_memory.py --resolution 512 --mode decode --tile 0     # (or --tile 128)

Each run: build the model layer by layer (bench.memory.build_components), one warm-up and two ZOODiP
steps (peak A: the training peak, VmHWM after reset_peak), then the default grid (3 prompts x 2 images,
classifier-free guidance) the chosen way (peak B). ``batched``: all 12 UNet rows in one call and one
decode of 6 images (the grid before it drew on large models one image at a time); ``one-at-a-time``:
what personalize does on a Stable Diffusion model now (decoding in train.GRID_DECODE_TILE px tiles).
``decode``: only the int8 autoencoder, one decode of one image (whole, or in ``--tile`` px tiles), its
peak over the process's resident memory before it. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--sample-steps", type=int, default=2)
    ap.add_argument("--mode", choices=["batched", "one-at-a-time", "decode"], required=True)
    ap.add_argument("--tile", type=int, default=0, help="decode mode: tile side in pixels (0: whole image)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    import tempfile
    from pathlib import Path

    from quantdream import memory
    from quantdream.bench.memory import BenchSpec, _implemented, _random_images, build_components
    from quantdream.data.dataset import SubjectImages
    from quantdream.train import RunConfig, _decode, sample_grid
    if a.mode == "decode":
        from quantdream.models.arch import build
        from quantdream.quant import quantize_model
        vae = build("sd15", "vae")
        quantize_model(vae, weights="int8")
        vae.requires_grad_(False).eval()
        z = torch.randn(1, vae.config.latent_channels, a.resolution // 8, a.resolution // 8)
        memory.reset_peak()
        before = memory.proc_status()["vmrss_mib"]
        t = time.perf_counter()
        with torch.no_grad():
            _decode(vae, z, a.tile)
        peak = memory.peak()["vmhwm_mib"]
        print(json.dumps({"arch": "sd15", "resolution": a.resolution, "mode": "decode", "tile": a.tile,
                          "weights": "int8", "rss_before_mib": round(before), "decode_peak_mib": round(peak),
                          "decode_adds_mib": round(peak - before), "seconds": round(time.perf_counter() - t, 1),
                          "threads": a.threads, "torch": torch.__version__}))
        return
    spec = BenchSpec(arch="sd15", method="zoodip", resolution=a.resolution, steps=2, images=2, threads=a.threads)
    bm = _implemented("zoodip")
    with tempfile.TemporaryDirectory() as tmp:
        data = SubjectImages(_random_images(Path(tmp) / "images", 2, a.resolution, 0), a.resolution)
        comps = build_components(spec, "int8", torch.device("cpu"), torch.float32, bm.prepare)
        comps["workdir"] = Path(tmp)
        vae = comps["vae"]
        data.encode(vae, float(vae.config.scaling_factor))
        trainer = bm.setup(comps, data, spec)
        trainer.step()                                           # warm-up
        memory.reset_peak()
        t = time.perf_counter()
        for _ in range(2):
            trainer.step()
        train = memory.peak()["vmhwm_mib"], (time.perf_counter() - t) / 2
        cfg = RunConfig()
        memory.reset_peak()
        t = time.perf_counter()
        obj = trainer.objective
        lat = (comps["unet"].config.in_channels, a.resolution // 8, a.resolution // 8)
        sample_grid(obj, vae, comps["scheduler"].config, trainer.method.theta, trainer.placeholder,
                    cfg.sample_prompts, cfg.sample_images, a.sample_steps, 7.5, 0, lat,
                    float(vae.config.scaling_factor), one_at_a_time=a.mode == "one-at-a-time")
        grid = memory.peak()["vmhwm_mib"], time.perf_counter() - t
    print(json.dumps({"arch": "sd15", "resolution": a.resolution, "mode": a.mode, "weights": "int8",
                      "zoodip_step_peak_mib": round(train[0]), "zoodip_seconds_per_step": round(train[1], 2),
                      "grid_peak_mib": round(grid[0]), "grid_seconds": round(grid[1], 1),
                      "grid_sample_steps": a.sample_steps, "grid_images": len(cfg.sample_prompts) * cfg.sample_images,
                      "threads": a.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
