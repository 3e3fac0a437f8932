"""Resolve and load a text-to-image model: ``tiny`` (the embedded model), a diffusers folder, or a
single-file ``.safetensors``/``.ckpt`` Stable Diffusion checkpoint, or a quantized folder written by
``quantdream quantize``. Never downloads."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..quant.io import INDEX as QUANTIZED_INDEX  # marks a folder written by `quantdream quantize`
from .embedded import PACKAGE_MODEL_DIR

# sampling defaults per model family: (steps, guidance)
SAMPLING_DEFAULTS = {"tiny": (25, 4.0), "sd": (50, 7.5)}


def warn_if_partially_trained(path: Path) -> None:
    """The package may ship a model whose training is not finished yet (it trains across sittings):
    say so once per process, with how far it got."""
    info = path / "training.json"
    if not info.is_file():
        return
    t = json.loads(info.read_text())
    done, total = int(t.get("unet_steps", 0)), int(t.get("args", {}).get("steps") or 0)
    if total and done < total and not _WARNED:
        _WARNED.append(path)
        logging.getLogger("quantdream").warning(
            "the packaged embedded model is partially trained (UNet %d of %d steps): expect rough images; "
            "see docs/embedded-model.md", done, total)


_WARNED: list = []


def is_quantized_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / QUANTIZED_INDEX).is_file()


def resolve_model(model: str | Path) -> Path:
    """Map ``tiny`` to the packaged embedded model and check that a path is a model we can read: a
    diffusers folder, a single-file checkpoint, or a quantized folder from ``quantdream quantize``."""
    if str(model) == "tiny":
        if not (PACKAGE_MODEL_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded model is not in this build of quantdream ({PACKAGE_MODEL_DIR} lacks model_index.json: "
                "its training is still under way, see docs/embedded-model.md); pass --model PATH to a local Stable "
                "Diffusion folder, or train it with `python -m quantdream.models.train_embedded`")
        warn_if_partially_trained(PACKAGE_MODEL_DIR)
        return PACKAGE_MODEL_DIR
    p = Path(model).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist (give `tiny` or a local Stable Diffusion "
                                "diffusers folder or .safetensors file; nothing is downloaded)")
    if is_quantized_folder(p):
        from ..quant.io import check_architecture, read_index
        read_index(p)                                   # format / version checks, clear errors
        check_architecture(p, PACKAGE_MODEL_DIR)        # one model, the one it says it was made from
        return p
    if p.is_dir() and not (p / "model_index.json").is_file():
        found = sorted(x.name for x in p.iterdir())[:10]
        raise ValueError(f"{p} is not a diffusers pipeline folder: no model_index.json (it holds {found}). "
                         "Point --model at the folder that contains model_index.json, unet/, vae/, text_encoder/")
    if p.is_file() and p.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{p} is not a Stable Diffusion checkpoint (.safetensors or .ckpt expected)")
    return p


def pipeline_class(path: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if is_quantized_folder(path):
        comps = json.loads((path / QUANTIZED_INDEX).read_text()).get("components", {})
        return StableDiffusionXLPipeline if "text_encoder_2" in comps else StableDiffusionPipeline
    if path.is_dir():
        name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        if "XL" in name:
            return StableDiffusionXLPipeline
        if name and name != "StableDiffusionPipeline":
            raise ValueError(f"{path} holds a {name}; quantdream supports StableDiffusionPipeline (SD-1.x/2.x) "
                             "and StableDiffusionXLPipeline")
    return StableDiffusionPipeline


def is_tiny(path: Path) -> bool:
    """The packaged embedded model, or a quantized folder made from it (its recorded source)."""
    if is_quantized_folder(path):
        source = json.loads((Path(path) / QUANTIZED_INDEX).read_text()).get("config", {}).get("source")
        return bool(source) and Path(source).resolve() == PACKAGE_MODEL_DIR.resolve()
    return Path(path).resolve() == PACKAGE_MODEL_DIR.resolve()


PIPELINE_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae", "unet", "scheduler")


def quantized_folder_parts(path: Path) -> list[str]:
    """The pipeline parts a quantized folder holds; refuses one that lacks any its pipeline needs."""
    comps = json.loads((path / QUANTIZED_INDEX).read_text()).get("components", {})
    need = [c for c in PIPELINE_PARTS if c in comps or not c.endswith("_2")]
    if "text_encoder_2" in comps:
        need = list(PIPELINE_PARTS)
    missing = [c for c in need if c not in comps]
    if missing:
        raise ValueError(f"{path} holds {', '.join(comps)} but a pipeline also needs {', '.join(missing)}: "
                         "re-run `quantdream quantize` on the whole diffusers pipeline folder")
    return need


def load_quantized_pipeline(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                            skip: tuple[str, ...] = (), narrow_embeddings: bool = False):
    """A stock diffusers pipeline around the modules of a quantized folder (built straight into their
    low-bit form, no float staging). ``skip``: parts not to load now (they are None in the pipeline);
    ``narrow_embeddings``: see :func:`quantdream.quant.io.load_quantized`."""
    from ..quant.io import load_quantized
    names = quantized_folder_parts(path)
    parts = load_quantized(path, [c for c in names if c not in skip], dtype=dtype, device=device,
                           narrow_embeddings=narrow_embeddings)
    cls = pipeline_class(path)
    kw = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if cls.__name__ == "StableDiffusionPipeline" else {}
    pipe = cls(**{c: parts.get(c) for c in names}, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str | Path = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a pipeline in ``dtype`` on ``device`` with no safety checker and no network access."""
    path = resolve_model(model)
    if is_quantized_folder(path):
        return load_quantized_pipeline(path, device, dtype)
    cls = pipeline_class(path)
    import diffusers
    new = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 40)
    kw = {"dtype" if new else "torch_dtype": dtype}
    if cls.__name__ == "StableDiffusionPipeline":
        kw.update(safety_checker=None, requires_safety_checker=False)
    if path.is_file():
        pipe = cls.from_single_file(str(path), local_files_only=True, **kw)
    else:
        pipe = cls.from_pretrained(str(path), local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda:"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not device[5:].isdigit() or int(device[5:]) >= n:
            have = ", ".join(f"cuda:{i}" for i in range(n))
            raise ValueError(f"--device {device}: torch sees {n} CUDA device(s){f' ({have})' if n else ''}; "
                             f"use --device auto, cpu{' or one of those' if n else ''}")
    return device
