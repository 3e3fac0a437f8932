"""Resolve and load a text-to-image model: ``tiny`` (the embedded model), a diffusers folder (plain or
fp16-variant-only), a single-file ``.safetensors``/``.ckpt`` SD-1.x/2.x/SDXL checkpoint, or a quantized
folder written by ``quantdream quantize``. Never downloads; anything else gets a one-line error naming
what is supported (docs/checkpoints.md)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..quant.io import INDEX as QUANTIZED_INDEX  # marks a folder written by `quantdream quantize`
from .embedded import EMBEDDED_MODELS, embedded_model_dir

# sampling defaults per model family: (steps, guidance)
SAMPLING_DEFAULTS = {"tiny": (25, 4.0), "sd": (50, 7.5)}


def warn_if_partially_trained(path: Path) -> None:
    """The package may ship a model whose training is not finished yet (it trains in resumable stages):
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
    """Map ``tiny`` (or ``tiny-v1``, ``tiny-v2``) to the packaged embedded model and check that a path is a
    model we can read: a diffusers folder, a single-file checkpoint, or a quantized folder from
    ``quantdream quantize``."""
    if (d := embedded_model_dir(str(model))) is not None:
        if not (d / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded model {str(model)!r} is not in this build of quantdream ({d.name} lacks "
                "model_index.json: see docs/embedded-model.md); pass --model PATH to a local Stable Diffusion folder, or train it with "
                "`python -m quantdream.models.train_embedded`")
        warn_if_partially_trained(d)
        return d
    p = Path(model).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist (give `tiny` or a local Stable Diffusion "
                                "diffusers folder or .safetensors file; nothing is downloaded)")
    if is_quantized_folder(p):
        from ..quant.io import check_architecture, read_index
        read_index(p)                                   # format / version checks, clear errors
        for embedded in EMBEDDED_MODELS.values():       # one model, the one it says it was made from
            check_architecture(p, embedded)
        return p
    if p.is_dir() and not (p / "model_index.json").is_file():
        found = sorted(x.name for x in p.iterdir())[:10]
        raise ValueError(f"{p} is not a diffusers pipeline folder: no model_index.json (it holds {found}). "
                         "Point --model at the folder that contains model_index.json, unet/, vae/, text_encoder/")
    if p.is_file():
        if p.suffix not in (".safetensors", ".ckpt"):
            raise ValueError(f"{p} is not a Stable Diffusion checkpoint (.safetensors or .ckpt expected)")
        from . import single_file
        single_file.detect(single_file.read_keys(p), p)  # damaged / not SD / SD3, Flux, refiner...: one line
    elif not is_quantized_folder(p):
        pipeline_class(p)                                  # unknown pipelines refused before loading
    return p


SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_NOT_SUPPORTED = {"StableDiffusion3Pipeline": "Stable Diffusion 3", "FluxPipeline": "Flux",
                  "LatentConsistencyModelPipeline": "a latent consistency (LCM) model",
                  "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner / img2img pipeline",
                  "StableDiffusionInpaintPipeline": "an inpainting model",
                  "StableDiffusionUpscalePipeline": "an upscaler"}


def _refuse_distilled(path: Path) -> None:
    """A few-step distilled model (LCM, LCM-LoRA fused) no longer predicts the noise of the DDPM process
    that personalization trains on, and it samples with its own scheduler: refuse it by name."""
    sched = path / "scheduler" / "scheduler_config.json"
    unet = path / "unet" / "config.json"
    name = json.loads(sched.read_text()).get("_class_name", "") if sched.is_file() else ""
    cond = json.loads(unet.read_text()).get("time_cond_proj_dim") if unet.is_file() else None
    if name in ("LCMScheduler", "TCDScheduler") or cond:
        raise ValueError(f"{path} is a consistency-distilled model (LCM / LCM-LoRA fused: "
                         f"{name or 'time_cond_proj_dim'}); quantdream supports standard SD-1.x/2.x and SDXL "
                         "diffusion models: use the base model it was distilled from")


def pipeline_class(path: Path):
    """StableDiffusionPipeline (SD-1.x/2.x) or StableDiffusionXLPipeline; a clear error for any other."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if is_quantized_folder(path):
        comps = json.loads((path / QUANTIZED_INDEX).read_text()).get("components", {})
        return StableDiffusionXLPipeline if "text_encoder_2" in comps else StableDiffusionPipeline
    if path.is_dir():
        name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        if name and name not in SUPPORTED_PIPELINES:
            what = _NOT_SUPPORTED.get(name, f"a {name}")
            raise ValueError(f"{path} holds {what} ({name}); quantdream supports StableDiffusionPipeline "
                             "(SD-1.x/2.x) and StableDiffusionXLPipeline (SDXL base) folders, and single-file "
                             "SD-1.x/2.x/SDXL checkpoints; see docs/checkpoints.md")
        _refuse_distilled(path)
        return StableDiffusionXLPipeline if name == "StableDiffusionXLPipeline" else StableDiffusionPipeline
    from . import single_file
    arch = single_file.detect(single_file.read_keys(path), path)
    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def is_tiny(path: Path) -> bool:
    """A packaged embedded model, or a quantized folder made from one (its recorded source)."""
    dirs = {d.resolve() for d in EMBEDDED_MODELS.values()}
    if is_quantized_folder(path):
        source = json.loads((Path(path) / QUANTIZED_INDEX).read_text()).get("config", {}).get("source")
        return bool(source) and Path(source).resolve() in dirs
    return Path(path).resolve() in dirs


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
    return _apply_prediction_type(pipe)


_PREDICTION: list[str] = []    # set by --prediction-type for the whole process


def set_prediction_type(prediction_type: str | None) -> None:
    """What the loaded models predict (epsilon, v_prediction, sample), overriding the file / folder."""
    from .single_file import PREDICTION_TYPES
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    _PREDICTION[:] = [prediction_type] if prediction_type else []


def _apply_prediction_type(pipe):
    if _PREDICTION and pipe.scheduler is not None:
        pipe.scheduler.register_to_config(prediction_type=_PREDICTION[0])
    return pipe


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_variant(path: Path) -> str | None:
    """``"fp16"`` for a folder whose weights are only fp16 variant files (``*.fp16.safetensors``), else None."""
    index = json.loads((path / "model_index.json").read_text())
    plain = variant = 0
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or not (path / name).is_dir():
            continue
        files = [f.name for f in (path / name).iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
        variant += any(".fp16." in f for f in files)
        plain += any(".fp16." not in f and not f.endswith(".index.json") for f in files)
    return "fp16" if variant and not plain else None


def check_weight_files(path: Path) -> None:
    """Read the header of every .safetensors in a diffusers folder: a damaged one gets one line, not a
    traceback from deep inside the loader."""
    from safetensors import safe_open
    for f in sorted(path.glob("*/*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any failure to read the header means the file is unusable
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{f} cannot be read (damaged or truncated .safetensors: {reason[:160]})") from None


def load_pipeline(model: str | Path = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a pipeline in ``dtype`` on ``device`` with no safety checker and no network access: a
    diffusers folder (fp16-variant-only folders upcast to ``dtype``), a single-file checkpoint (see
    :mod:`quantdream.models.single_file`) or a quantized folder."""
    path = resolve_model(model)
    if is_quantized_folder(path):
        return load_quantized_pipeline(path, device, dtype)
    cls = pipeline_class(path)
    import diffusers
    new = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 40)
    kw = {"dtype" if new else "torch_dtype": dtype}
    if cls.__name__ == "StableDiffusionPipeline":
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if path.is_file():
        from . import single_file
        pipe = single_file.load(path, _PREDICTION[0] if _PREDICTION else None, **kw)
    else:
        check_weight_files(path)
        variant = weights_variant(path)
        if variant:
            kw["variant"] = variant
        pipe = cls.from_pretrained(str(path), local_files_only=True, **kw)
        _apply_prediction_type(pipe)
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
