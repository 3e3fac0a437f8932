"""`quantdream generate`: text-to-image on the embedded model or a local Stable Diffusion model."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="generate images from prompts (embedded model by default)",
        description="Generate images from text prompts with the embedded model or any local Stable Diffusion "
                    "model; writes one PNG per image and grid.png (one row per prompt).")
    p.add_argument("prompts", nargs="*", help="prompt(s); use {} or the token of a loaded embedding for a learned subject")
    p.add_argument("--prompts-file", help="text file with one prompt per line")
    p.add_argument("--model", default="tiny", help="`tiny` (embedded model, default), a local diffusers folder / .safetensors, "
                                                        "or a quantized folder from `quantdream quantize`")
    p.add_argument("--embedding", action="append", default=[],
                   help="learned_embeds.safetensors (or A1111 .pt; on SDXL a clip_l/clip_g file) to load with diffusers' "
                        "load_textual_inversion; repeatable")
    p.add_argument("--adapter", action="append", default=[],
                   help="a `quantdream personalize` output folder or file of any method: LoRA "
                        "(pytorch_lora_weights.safetensors), DreamBooth unet/, PEQA/TuneQDM scales.safetensors "
                        "(timestep hook for S1/S2/TAS) or a learned embedding; {} in prompts becomes its "
                        "prompt text (e.g. 'sks bag'); repeatable")
    p.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed+j (default 0)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 25 embedded, 50 SD)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 4.0 embedded, 7.5 SD)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    return p


def run(args) -> int:
    from ..models.load import SAMPLING_DEFAULTS, is_tiny, load_pipeline, pick_device, resolve_model
    from ..models.sample import generate_images, make_grid, save_images
    prompts = list(args.prompts)
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise FileNotFoundError(f"--prompts-file {f} does not exist")
        prompts += [l.strip() for l in f.read_text().splitlines() if l.strip()]
    if not prompts:
        raise ValueError("give at least one prompt (positional) or --prompts-file")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    for e in args.embedding:
        if not Path(e).is_file():
            raise FileNotFoundError(f"--embedding {e} does not exist")
    for a in args.adapter:
        if not Path(a).exists():
            raise FileNotFoundError(f"--adapter {a} does not exist")
    path = resolve_model(args.model)
    steps, guidance = SAMPLING_DEFAULTS["tiny" if is_tiny(path) else "sd"]
    pipe = load_pipeline(path, device=pick_device(args.device))
    tokens = []
    from ..models.sdxl import load_into_pipeline
    for e in args.embedding:        # SDXL files (clip_l + clip_g): once per text encoder
        tokens += load_into_pipeline(pipe, e)
    from ..methods.adapters import apply_adapter
    for a in args.adapter:
        info = apply_adapter(pipe, a)
        tokens += [info["prompt_text"]] if info["prompt_text"] else []
    if tokens:
        prompts = [p.replace("{}", tokens[0]) for p in prompts]
    rows = generate_images(pipe, prompts, args.num_images, args.seed, args.steps or steps, args.guidance or guidance)
    out = Path(args.out)
    paths = save_images(rows, prompts, out)
    make_grid(rows).save(out / "grid.png")
    print(f"wrote {len(paths)} images and {out / 'grid.png'}")
    return 0
