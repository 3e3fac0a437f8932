"""`quantdream evaluate`: the DreamBooth protocol (subjects x prompts x images) on a list of runs."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

EPILOG = """examples:
  quantdream evaluate runs/zoodip-teal-bag runs/ti-teal-bag --out eval/teal-bag --baseline
  quantdream evaluate runs/*/ --out eval/all --prompts context,property --images-per-prompt 2
  quantdream evaluate runs/my-bag --subject examples/subjects/teal_bag --clip ~/models/clip-vit-b32 --out eval/

Each run is rendered on the model it was trained on (quantized as in training). TI-style runs (ti, zoodip, zoodip-fast, gf-ti)
put the token alone in place of {}; DreamBooth-style runs put "<token> <class word>"; the baseline puts the
init word with no personalization. CLIP-T compares each image with its prompt with the class word in place
of the token. Outputs: OUT/metrics.json, OUT/metrics.md, OUT/grids/<run>__<subject>.png (rows: prompts).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="score personalization runs: CLIP-I/CLIP-T/DINO, world metrics, prompt accuracy",
        description="Render every prompt of each run's subject with its learned token (same seeds for every "
                    "run) and score subject fidelity (CLIP-I, EfficientNet-Lite0 / DINO) and prompt fidelity "
                    "(CLIP-T, prompt accuracy), per subject and as the mean over subjects.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("runs", nargs="+", metavar="RUN_DIR", help="finished run folders (the --out of quantdream personalize)")
    a("--out", required=True, help="folder for metrics.json, metrics.md and grids/")
    a("--subject", help="subject folder with subject.json (default: the one beside each run's training photos)")
    a("--images-per-prompt", dest="images_per_prompt", type=int, default=4, help="images per prompt (default 4)")
    a("--prompts", help="prompt kinds to use, comma-separated: context,property,composition (default all)")
    a("--baseline", action="store_true",
      help="also score the init word with no personalization (the floor), on the model each run renders on "
           "(token methods: the run's quantized model; PEQA/TuneQDM: the float model with its UNet quantized)")
    a("--clip", help="local transformers CLIP folder for real CLIP-I / CLIP-T (e.g. clip-vit-base-patch32)")
    a("--dino", help="local transformers DINOv2 (or DINO ViT) folder for the real DINO metric")
    a("--evaluator", help="world evaluator folder (default: the packaged one)")
    a("--seed", type=int, default=0, help="image j of every prompt uses seed+j (default 0)")
    a("--steps", type=int, default=0, help="DDIM steps (default 25 on the embedded model, 50 otherwise)")
    a("--guidance", type=float, default=0.0, help="classifier-free guidance (default 4.0 embedded, 7.5 otherwise)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to render (default auto)")
    a("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    a("--overwrite", action="store_true", help="replace metrics in an --out folder that already has them")
    return p


def run(args) -> int:
    from ..eval.protocol import EvalSettings, evaluate_runs, parse_kinds
    from ..eval.real_encoders import check_clip_folder, check_dino_folder
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {args.out!r} is a file; give a folder")
    if (out / "metrics.json").is_file() and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already holds metrics.json; choose a new folder or pass --overwrite")
    if args.steps < 0 or args.guidance < 0 or args.threads < 0:
        raise ValueError("--steps, --guidance and --threads must be >= 0")
    if args.clip:
        check_clip_folder(args.clip)
    if args.dino:
        check_dino_folder(args.dino)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    settings = EvalSettings(images_per_prompt=args.images_per_prompt, kinds=parse_kinds(args.prompts), seed=args.seed,
                            steps=args.steps, guidance=args.guidance, baseline=args.baseline, device=args.device)

    def show(row: dict) -> None:
        m = row["metrics"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))
        print(f"{row['name']} on {row['subject']}: {parts}", file=sys.stderr)

    result = evaluate_runs(args.runs, out, subject=args.subject, settings=settings, clip=args.clip, dino=args.dino,
                           evaluator_dir=args.evaluator, callback=show)
    for note in result["notes"][2:]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and {len(result['rows'])} grids in {out / 'grids'}")
    return 0
