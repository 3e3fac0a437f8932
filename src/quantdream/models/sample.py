"""Sampling helpers shared by `quantdream generate`, evaluation and the benchmarks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def use_fast_sampler(pipe) -> None:
    """The embedded model ships SD's DDPMScheduler (its training schedule); sample it with DDIM."""
    from diffusers import DDIMScheduler, DDPMScheduler
    if isinstance(pipe.scheduler, DDPMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def generate_images(pipe, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int = 25,
                    guidance: float = 4.0, batch_size: int = 16) -> list[list[Image.Image]]:
    """Images for each prompt; image j of every prompt uses seed ``seed + j`` (reproducible, and the
    same starting noise across prompts and methods). Returns ``out[prompt_index][j]``."""
    use_fast_sampler(pipe)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_images)]
    out: list[list[Image.Image | None]] = [[None] * num_images for _ in prompts]
    dev = pipe.device
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k:k + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seed + j) for _, j in chunk]
        h = pipe.unet.config.sample_size
        lat = torch.stack([torch.randn(pipe.unet.config.in_channels, h, h, generator=g) for g in gens])
        res = pipe([prompts[i] for i, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   latents=lat.to(dev, pipe.unet.dtype), output_type="pil")
        for (i, j), img in zip(chunk, res.images):
            out[i][j] = img
    return out


def make_grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    """One row per list of images."""
    w, h = rows[0][0].size
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def to_uint8(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def slug(text: str, n: int = 60) -> str:
    s = "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
    while "__" in s:
        s = s.replace("__", "_")
    return s[:n] or "prompt"


def save_images(rows: list[list[Image.Image]], prompts: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (p, row) in enumerate(zip(prompts, rows)):
        for j, img in enumerate(row):
            path = out / f"{i:03d}_{slug(p)}_{j}.png"
            img.save(path)
            paths.append(path)
    return paths
