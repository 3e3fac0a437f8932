"""`quantdream personalize`: learn a token for a subject from a few photos."""
from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

EPILOG = """examples:
  quantdream personalize --images photos/ --token "<my-bag>" --init-word bag --out runs/my-bag
  quantdream personalize --images photos/ --token "<my-bag>" --init-word bag --method ti --weights none --out runs/ti
  quantdream personalize --config run.toml --set zoodip.n=4 --set zoodip.sg=false --out runs/ablation
  quantdream personalize --config run.toml --out runs/my-bag --resume      # after Ctrl-C
  quantdream personalize --images photos/ --init-word bag --method dreambooth --out runs/db   # prompt "sks bag"
  quantdream personalize --images photos/ --init-word bag --method tuneqdm --set tuneqdm.num_experts=2 --out runs/tq
  quantdream generate "a photo of {} on the beach" --adapter runs/tq        # any method's output folder

methods: zoodip, zoodip-fast, ti, gf-ti learn a new token (learned_embeds.safetensors); dreambooth (unet/), lora and
qlora (pytorch_lora_weights.safetensors), peqa, tuneqdm, tuneqdm-s1, tuneqdm-s2 (scales.safetensors)
adapt the UNet and use the prompt "a photo of sks <init-word>" (--token sets the identifier).

settings: defaults < --config FILE.toml < flags/--set. The resolved settings are written to OUT/config.toml.
"""


# Written out so that --help does not import torch (train.EMBEDDED_DEFAULTS / SD_DEFAULTS, RunConfig; a test
# checks they agree)
STEP_DEFAULTS = ("zoodip 1500/30000, zoodip-fast 500/10000, ti 400/5000, gf-ti 675/13000, dreambooth 400, "
                 "lora 500, qlora 500, peqa 400, tuneqdm(-s1, -s2) 400 (tiny/SD)")
SAMPLE_EVERY, CHECKPOINT_EVERY = 500, 500


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "personalize", help="personalize a model to your subject from 3-6 photos (ZOODiP and the baselines)",
        description="Learn a new token (e.g. <my-bag>) that renders your subject, on a quantized model. "
                    "ZOODiP uses forward passes only; textual inversion (ti) backpropagates to the token.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--images", help="folder with 3-6 photos of the subject (png/jpg/webp/bmp)")
    a("--token", help='the new token to learn, e.g. "<my-bag>" (must not be a word the model knows)')
    a("--init-word", dest="init_word", help="one-token class word to start from, e.g. bag")
    a("--out", help="output folder (new or empty; with --resume, the interrupted run's folder)")
    a("--model", help="'tiny' (the embedded model, default), a local Stable Diffusion diffusers folder, a "
                       "single-file .safetensors/.ckpt checkpoint (docs/checkpoints.md), or a quantized folder "
                       "written by `quantdream quantize` (its bit width then fixes --weights)")
    from ..methods import METHODS
    a("--method", choices=list(METHODS),
      help="zoodip (default; forward passes only), zoodip-fast (1/9 of zoodip's passes on the embedded model, 1/3 on SD), "
           "ti, gf-ti, dreambooth, lora, qlora, peqa, tuneqdm, tuneqdm-s1, tuneqdm-s2")
    a("--weights", choices=["auto", "int8", "int4", "none", "nf4"],
      help="weight quantization of the frozen model (default auto: int8; none for dreambooth/lora; nf4 for qlora)")
    a("--acts", type=int, help="8: Q-Diffusion-style calibrated activations on the quantized UNet (W8A8 / W4A8)")
    a("--steps", type=int, help=f"training steps, >= 1 (default: the method's for the model: {STEP_DEFAULTS})")
    a("--resolution", type=int, help="training image size in pixels (default: the model's native size: 64 for the "
                                      "embedded model, 512 SD-1.5, 768 SD-2.1, 1024 SDXL)")
    a("--seed", type=int, help="seed of every random stream (default 0)")
    a("--lr", type=float, help="learning rate of the chosen method")
    a("--config", help="TOML file with settings (flags override it)")
    a("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    a("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="activation dtype (default auto)")
    a("--num-vectors", dest="num_vectors", type=int, help="embedding vectors per token (default 1)")
    a("--batch-size", dest="batch_size", type=int, help="images per step (default 1)")
    a("--captions", help="'auto' (IMAGES/captions.json if present, else templates), 'templates', or a JSON "
                         'file {"00.png": "a photo of a {} on a green background", ...}')
    a("--learnable-property", dest="learnable_property", choices=["object", "style"],
      help="caption templates for an object (default) or a style")
    a("--init-embedding", dest="init_embedding", help="start from a saved embedding file instead of --init-word")
    a("--sample-every", dest="sample_every", type=int,
      help=f"sample grid every N steps (default {SAMPLE_EVERY}; 0: final grid only)")
    a("--checkpoint-every", dest="checkpoint_every", type=int,
      help=f"checkpoint + snapshot every N steps (default {CHECKPOINT_EVERY}; 0: only at the end)")
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    a("--low-memory", dest="low_memory", action="store_true", default=None,
      help="lower the resident peak at some speed: freed memory returns to the OS at once, peft and "
           "bitsandbytes are not imported unless the method uses them, torch's compiler (torch._dynamo) only if "
           "something needs it, the UNet runs one row at a time, "
           "feed-forwards in chunks, up blocks without building the skip concatenation, the autoencoder's "
           "encoder is freed once the photos are encoded (and its decoder too with --set sample_images=0); a "
           "quantized folder's token table is read from the file on demand in any mode")
    a("--export-a1111", dest="export_a1111", action="store_true", default=None,
      help="also write learned_embeds.pt for AUTOMATIC1111")
    a("--resume", action="store_true", default=None, help="continue the interrupted run in --out")
    # ---- time: the plan, a limit, processes
    a("--dry-run", dest="dry_run", action="store_true", default=None,
      help="measure a few warm-up steps, print the time plan (UNet passes, s/pass, ETA, peak memory) and stop; "
           "nothing is written")
    a("--max-hours", dest="max_hours", type=float,
      help="refuse a run whose planned time exceeds H hours (the plan is measured before step 0)")
    a("--nproc", type=int, default=1,
      help="zoodip, zoodip-fast, gf-ti: split each step's candidates over K local processes (torchrun with "
           "--nproc-per-node K -m quantdream personalize ... for several machines); same token as one process")
    a("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
      help="any setting, e.g. zoodip.n=4, zoodip.sg=false, ti.puts=true, sample_prompts='[\"a {}\"]'")
    return p


FLAGS = ("images", "token", "init_word", "out", "model", "method", "weights", "acts", "steps", "resolution", "seed", "device", "dtype",
         "num_vectors", "batch_size", "captions", "learnable_property", "init_embedding", "sample_every",
         "checkpoint_every", "threads", "low_memory", "export_a1111", "resume", "dry_run", "max_hours")


def config_from_args(args):
    from ..train import build_config, parse_assignment
    overrides: dict = {}
    for text in args.assignments:
        for k, v in parse_assignment(text).items():
            overrides[k] = {**overrides.get(k, {}), **v} if isinstance(v, dict) else v
    for name in FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    if overrides.get("steps") == 0:
        raise ValueError("--steps 0: give the number of training steps (>= 1), or leave --steps out for the "
                         "method's default (see --help)")
    cfg = build_config(args.config, overrides)
    if args.lr is not None:
        from ..methods import METHODS, section_name
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
        if cfg.method == "gf-ti":
            raise ValueError("--lr does not apply to gf-ti (CMA-ES has a step size): use --set gf_ti.sigma0=...")
        sect = dict(getattr(cfg, section_name(cfg.method)))
        sect["lr"] = args.lr
        setattr(cfg, section_name(cfg.method), sect)
    return cfg


def run(args) -> int:
    from ..train import personalize
    cfg = config_from_args(args)
    if args.nproc != 1:
        return _launch(args, cfg)
    rank0 = os.environ.get("RANK", "0") == "0"     # under torchrun / --nproc, rank 0 speaks for all
    if not rank0:
        logging.getLogger().setLevel(logging.WARNING)
    result = personalize(cfg, progress=True)
    if not rank0:
        return 0 if result.completed or cfg.dry_run else 130
    if cfg.dry_run:      # the plan was logged; nothing was written
        return 0
    if not result.completed:
        print(f"interrupted at step {result.step}; continue with the same command plus --resume", file=sys.stderr)
        return 130
    s = result.summary
    print(f"{cfg.method}: {s['prompt_text']!r} in {s['steps']} steps ({s['unet_forward_passes']} UNet forward passes, "
          f"{s['seconds']:.0f} s): {', '.join(f'{cfg.out}/{o}' for o in s['outputs'])}")
    return 0


def _launch(args, cfg) -> int:
    """--nproc K: the same command on K local ranks (torch.distributed.run), checked here first."""
    from ..distributed import DISTRIBUTED_METHODS, launch
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if cfg.method not in DISTRIBUTED_METHODS:
        raise ValueError(f"--nproc {args.nproc}: --method {cfg.method} backpropagates and runs in one process; "
                         f"use one of {', '.join(DISTRIBUTED_METHODS)}")
    argv = list(getattr(args, "_argv", None) or sys.argv[1:])
    i = argv.index("--nproc") if "--nproc" in argv else None
    argv = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--nproc=")]
    return launch(args.nproc, argv)
