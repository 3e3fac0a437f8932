"""`quantdream quantize`: write a quantized model folder (low-bit weights, optional calibrated A8)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# timestep-aware calibration prompts when --calib-prompts is not given (the embedded world's words,
# which SD's vocabulary also covers)
DEFAULT_CALIB_PROMPTS = [
    "a large red bag on a striped blue background", "a photo of a small green sneaker",
    "a white dress next to a black coat", "a picture of a yellow pullover on a dotted purple background",
    "an orange sandal at the top left", "a brown boot on a checkered pink background",
    "a blue shirt next to a red trousers", "a rendering of a small black top on a plain white background",
]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="quantize a model to int8/int4 weights (optionally 8-bit activations) and save it",
        description="Quantize the UNet, text encoder(s) and VAE of the embedded model or a local Stable Diffusion "
                    "diffusers folder and write a quantized folder that every personalization command accepts. "
                    "int8 = symmetric per-output-channel round-to-nearest (quanto's qint8, as ZOODiP); int4/int2 = "
                    "asymmetric group-wise, packed. --acts 8 adds Q-Diffusion-style activation quantizers "
                    "calibrated over sampling timesteps (W8A8 / W4A8).")
    p.add_argument("--model", default="tiny", help="`tiny` (embedded model, default), a local diffusers folder "
                                                        "or a single-file .safetensors/.ckpt (docs/checkpoints.md)")
    p.add_argument("--weights", default="int8", help="int8 (default), int4, int2 or none")
    p.add_argument("--group-size", type=int, default=128,
                   help="inputs per scale group for int4/int2 (default 128, quanto's rule; 0 = per output channel)")
    p.add_argument("--components", default=None,
                   help="comma-separated components to quantize (default: every UNet / text encoder / VAE); "
                        "the others are saved unquantized")
    p.add_argument("--acts", type=int, default=None, help="activation bits for the UNet (e.g. 8); default: float")
    p.add_argument("--calib-prompts", default=None, help="text file, one calibration prompt per line (for --acts)")
    p.add_argument("--calib-steps", type=int, default=25, help="sampling steps per calibration prompt (default 25)")
    p.add_argument("--calib-every", type=int, default=1, help="keep the UNet inputs of every k-th step (default 1)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale of the calibration sampling (default 7.5)")
    p.add_argument("--float-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="storage of the tensors that stay float: embeddings, norms, biases (default fp16; "
                        "loaded back as fp32). Scales are always fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default 0)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_CALIB_PROMPTS)
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--calib-prompts {f} does not exist")
    prompts = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--calib-prompts {f} holds no prompts (one per line expected)")
    return prompts


def run(args) -> int:
    from torch import nn

    from ..models.load import load_pipeline, resolve_model
    from ..quant import parse_weights, quantize_model, storage_bytes
    from ..quant.activations import calibrate_activations, collect_unet_inputs
    from ..quant.io import save_quantized

    # 1. check every input before loading anything
    bits = parse_weights(args.weights)
    if args.group_size < 0:
        raise ValueError(f"--group-size must be >= 0 (0 = per output channel), got {args.group_size}")
    if args.acts is not None:
        if not 2 <= args.acts <= 16:
            raise ValueError(f"--acts {args.acts}: activation width must be 2..16 bits (8 for W8A8 / W4A8)")
        if bits is None:
            raise ValueError("--acts needs quantized weights: pass --weights int8 or int4")
        if args.calib_steps < 1 or args.calib_every < 1:
            raise ValueError("--calib-steps and --calib-every must be >= 1")
    prompts = _read_prompts(args.calib_prompts) if args.acts is not None else []
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    path = resolve_model(args.model)

    # 2. load the float pipeline
    pipe = load_pipeline(path, device="cpu")
    parts = {k: v for k, v in pipe.components.items() if v is not None}
    modules = [k for k, v in parts.items() if isinstance(v, nn.Module)]
    chosen = modules if args.components is None else [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in modules]
    if unknown:
        raise ValueError(f"--components {','.join(unknown)}: not in this model; it has {', '.join(modules)}")
    if args.acts is not None and "unet" not in chosen:
        raise ValueError("--acts quantizes the UNet's activations; include unet in --components")
    if args.acts is not None and getattr(pipe.unet.config, "addition_embed_type", None):
        raise ValueError("--acts calibration supports SD-1.x/2.x UNets; SDXL's extra conditioning is not handled yet")

    # 3. timestep-aware calibration set, sampled with the float model
    inputs = None
    if args.acts is not None:
        logger.info("collecting calibration inputs: %d prompts x %d steps", len(prompts), args.calib_steps)
        inputs = collect_unet_inputs(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, prompts,
                                     num_inference_steps=args.calib_steps, guidance_scale=args.guidance,
                                     vae_scale_factor=pipe.vae_scale_factor, every=args.calib_every, seed=args.seed)

    # 4. weights, one component at a time
    sizes = {}
    for name in chosen:
        before = storage_bytes(parts[name])
        quantize_model(parts[name], args.weights, group_size=args.group_size)
        sizes[name] = (before, storage_bytes(parts[name]))
        logger.info("%s: %.1f MiB -> %.1f MiB", name, before / 2**20, sizes[name][1] / 2**20)

    # 5. activations
    if args.acts is not None:
        info = calibrate_activations(pipe.unet, inputs, bits=args.acts)
        logger.info("calibrated %d activation quantizers on %d UNet calls", info["quantizers"], info["calls"])

    # 6. write
    config = {"source": str(path), "weights": args.weights, "group_size": args.group_size,
              "quantized_components": chosen, "acts": args.acts,
              "calibration": None if args.acts is None else
              {"prompts": len(prompts), "steps": args.calib_steps, "every": args.calib_every,
               "guidance": args.guidance, "seed": args.seed, "search": "mse", "shortcut_split": True,
               "softmax_bits": 16}}
    save_quantized(parts, out, config, float_dtype=args.float_dtype, overwrite=args.overwrite)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    logger.info("wrote %s (%.1f MiB)", out, total / 2**20)
    return 0
