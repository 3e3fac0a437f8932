"""`quantdream generate`: text-to-image on the embedded model or a local Stable Diffusion model."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="generate images from prompts (embedded model by default)",
        description="Generate images from text prompts with the embedded model or any local Stable Diffusion "
                    "model; writes one PNG per image and grid.png (one row per prompt).")
    p.add_argument("prompts", nargs="*", help="prompt(s); use {} or the token of a loaded embedding for a learned subject")
    p.add_argument("--prompts-file", help="text file with one prompt per line")
    p.add_argument("--model", default="tiny", help="`tiny` (embedded model, default), a local diffusers folder / .safetensors / .ckpt, "
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
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto)")
    p.add_argument("--out", default="out/generate", help="output folder (default out/generate; files in it are "
                                                         "replaced)")
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
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1 (leave it out for the model's default), got {args.steps}")
    for e in args.embedding:
        if not Path(e).is_file():
            raise FileNotFoundError(f"--embedding {e} does not exist")
    for a in args.adapter:
        if not Path(a).exists():
            raise FileNotFoundError(f"--adapter {a} does not exist")
    if not (args.embedding or args.adapter) and any("{}" in p for p in prompts):
        raise ValueError("a prompt has '{}' (where a learned subject goes) but no --embedding or --adapter was "
                         "given; pass the run's learned_embeds.safetensors or output folder, or remove the '{}'")
    out = check_out(Path(args.out))
    device = pick_device(args.device)
    path = resolve_model(args.model)
    from ..export import load_embedding
    for e in args.embedding:
        try:
            load_embedding(e)
        except ValueError as err:     # damaged or foreign file: refused before the model is loaded
            if "SDXL" not in str(err):
                raise ValueError(f"--embedding: {err}") from None
    steps, guidance = SAMPLING_DEFAULTS["tiny" if is_tiny(path) else "sd"]
    pipe = load_pipeline(path, device=device)
    tokens = [added[0] for added in load_embeddings(pipe, args.embedding) if added]
    from ..methods.adapters import apply_adapter
    for a in args.adapter:
        info = apply_adapter(pipe, a)
        tokens += [info["prompt_text"]] if info["prompt_text"] else []
    if tokens:
        prompts = [p.replace("{}", tokens[0]) for p in prompts]
    for t in tokens:
        if not any(t in p for p in prompts):
            logger.warning("warning: no prompt uses %r (loaded from --embedding/--adapter); write it, or {}, "
                           "where the subject goes", t)
    rows = generate_images(pipe, prompts, args.num_images, args.seed, args.steps or steps, args.guidance or guidance)
    paths = save_images(rows, prompts, out)
    make_grid(rows).save(out / "grid.png")
    print(f"wrote {len(paths)} images and {out / 'grid.png'}")
    return 0


def check_out(out: Path) -> Path:
    """--out must be a folder we can write: checked before anything is rendered."""
    from ..checkpoint import check_writable
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; give a folder (images and grid.png go in it)")
    check_writable(out, "--out")
    return out


def load_embeddings(pipe, files: list[str]) -> list[list[str]]:
    """Stock ``load_textual_inversion`` for each file, after checking it fits this model's text encoder;
    returns the tokens each file added."""
    from ..export import check_embedding_fits
    from ..models.sdxl import load_into_pipeline
    widths = [te.get_input_embeddings().weight.shape[1]
              for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if te is not None]
    added = []
    for e in files:
        check_embedding_fits(e, widths)
        added.append(load_into_pipeline(pipe, e))      # SDXL files (clip_l + clip_g): once per text encoder
    return added
