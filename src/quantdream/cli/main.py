"""`quantdream` command line: thin wrappers that parse, call the library, and exit.

Each subcommand lives in ``quantdream/cli/<name>.py`` and defines ``add_parser(subparsers)``
(returning its parser) and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

# quiet the model libraries' import chatter (e.g. "requires torchvision") unless --verbose
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes (QLoRA's NF4) warns on import that it could not fetch an optional CPU kernel from the model hub,
# which quantdream never uses (no network); keep its real errors
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# order shown in --help; a module that is not there yet is simply not offered
COMMANDS = ["generate", "personalize", "quantize", "evaluate", "bench", "compare", "batch", "world", "serve"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(
        prog="quantdream",
        description="Personalize text-to-image diffusion models on quantized weights, with forward passes "
                    "only (ZOODiP) or with the gradient baselines, and measure them side by side.",
    )
    p.add_argument("--version", action="version", version=f"quantdream {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        modname = f"quantdream.cli.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        mod = importlib.import_module(modname)
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
        if any("--model" in a.option_strings for a in sp._actions):
            add_prediction_type(sp)
    return p


def add_prediction_type(parser: argparse.ArgumentParser) -> None:
    """Every command that takes --model also takes --prediction-type (single-file SD-2.x checkpoints do
    not always say whether they are v-prediction models; see docs/checkpoints.md)."""
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
                        help="what the model predicts, overriding the checkpoint / scheduler config (default: read "
                             "from the model; a single-file SD-2.x checkpoint without a v_pred key or .yaml beside "
                             "it is taken as v_prediction)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv          # what a launcher re-runs on each rank (personalize --nproc)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "prediction_type", None):
            from ..models.load import set_prediction_type
            set_prediction_type(args.prediction_type)
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"quantdream {args.command}: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:    # a file or folder the checks before the work could not foresee
        print(f"quantdream {args.command}: error: no permission: {e.filename or e} ({e.strerror}); check the "
              f"paths given", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
