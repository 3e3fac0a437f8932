"""Single-file Stable Diffusion checkpoints: one ``.safetensors`` / ``.ckpt`` in the original LDM layout
(as A1111, ComfyUI and model sites share them), for SD-1.x, SD-2.x and SDXL base models, loaded offline.

A single file holds the weights only. What diffusers' ``from_single_file`` still needs comes from the
package, never from the hub:

    architecture    from the file's keys       cond_stage_model.transformer.*  -> SD-1.x (CLIP ViT-L)
                                               cond_stage_model.model.*        -> SD-2.x (OpenCLIP ViT-H)
                                               conditioner.embedders.{0,1}.*   -> SDXL base (CLIP-L + bigG)
    component configs   assets/arch/<arch>.json (the published diffusers configs)
    scheduler, tokenizers   assets/arch/single-file.json, CLIP's BPE in assets/clip-bpe
    prediction type     --prediction-type, else a ``v_pred`` key in the file, else ``parameterization``
                        in a ``<name>.yaml`` beside it (A1111's convention), else the architecture's
                        default (SD-2.x: v_prediction, as SD-2.0/2.1 at 768 px; others: epsilon)
"""
from __future__ import annotations

import gzip
import json
import logging
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from .arch import ARCH_DIR as _PACKAGE_ARCH_DIR

ARCH_DIR = _PACKAGE_ARCH_DIR                      # component configs per architecture (tests point it elsewhere)
BPE = _PACKAGE_ARCH_DIR.parent / "clip-bpe" / "merges.txt.gz"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUPPORTED = "SD-1.x, SD-2.x and SDXL base checkpoints (.safetensors or .ckpt, original LDM/A1111 layout)"

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "first_stage_model.encoder.conv_in.weight"
TEXT_KEYS = {  # architecture -> a key only its text encoder(s) have
    "sdxl": "conditioner.embedders.1.model.ln_final.weight",
    "sd21": "cond_stage_model.model.ln_final.weight",
    "sd15": "cond_stage_model.transformer.",      # a prefix: CLIP in transformers' own layout
}
# files that are not a whole SD model, by a key prefix they carry: what to tell the user
NOT_A_MODEL = (
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 checkpoint"),
    ("joint_blocks.", "a Stable Diffusion 3 checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
    ("double_blocks.", "a Flux checkpoint"),
    ("conditioner.embedders.0.model.", "an SDXL refiner checkpoint"),
    ("lora_unet_", "a LoRA (an add-on, not a model)"),
    ("lora_te", "a LoRA (an add-on, not a model)"),
    ("string_to_param", "a textual-inversion embedding (use generate --embedding)"),
    ("emb_params", "a textual-inversion embedding (use generate --embedding)"),
    ("clip_l", "an SDXL textual-inversion embedding (use generate --embedding)"),
    ("encoder.conv_in.weight", "a VAE on its own"),
)


def read_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, without loading the weights; a one-line error for a damaged file.
    Read once per file version (a command checks, then loads)."""
    path = Path(path)
    st = path.stat()
    return dict(_read_keys(str(path.resolve()), st.st_mtime_ns, st.st_size))


@lru_cache(maxsize=8)
def _read_keys(name: str, mtime_ns: int, size: int) -> dict[str, tuple[int, ...]]:
    path = Path(name)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        import torch
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:                      # legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors/pickle raise many types; the user needs one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model {path} cannot be read as a {path.suffix} checkpoint (damaged, truncated or not "
                         f"a checkpoint: {reason[:160]})") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"--model {path} holds a {type(sd).__name__}, not a state dict of weights")
    return {k: tuple(getattr(v, "shape", ())) for k, v in sd.items()}


def detect(keys: dict[str, tuple[int, ...]], path: Path | str = "the file") -> str:
    """``sd15`` / ``sd21`` / ``sdxl`` from the keys; a clear error for anything else."""
    if UNET_IN not in keys:
        for prefix, what in NOT_A_MODEL:
            if any(k.startswith(prefix) for k in keys):
                raise ValueError(f"--model {path} is {what}; quantdream supports {SUPPORTED}")
        raise ValueError(f"--model {path} is not a Stable Diffusion checkpoint (no {UNET_IN}); quantdream supports "
                         f"{SUPPORTED}")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and TEXT_KEYS["sdxl"] not in keys:
        raise ValueError(f"--model {path} is an SDXL refiner checkpoint; quantdream supports {SUPPORTED}")
    arch = next((a for a, k in TEXT_KEYS.items() if k in keys or (k.endswith(".") and
                                                                  any(x.startswith(k) for x in keys))), None)
    if arch is None:
        raise ValueError(f"--model {path} has a UNet but no text encoder this package recognises (CLIP / OpenCLIP); "
                         f"quantdream supports {SUPPORTED}")
    if VAE_IN not in keys:
        raise ValueError(f"--model {path} has no VAE (first_stage_model.*): quantdream needs the whole model "
                         "(UNet, VAE, text encoders) in one file")
    in_ch = keys[UNET_IN][1] if len(keys[UNET_IN]) > 1 else 4
    if in_ch != 4:
        what = "an inpainting model (9 input channels)" if in_ch == 9 else f"a UNet with {in_ch} input channels"
        raise ValueError(f"--model {path} is {what}; quantdream supports text-to-image {SUPPORTED}")
    return arch


@lru_cache(maxsize=None)
def _extras() -> dict:
    spec = json.loads((_PACKAGE_ARCH_DIR / "single-file.json").read_text())
    spec.pop("_comment", None)
    return spec


def pipeline_name(arch: str) -> str:
    return _extras()[arch]["pipeline"]


def prediction_type(path: Path, keys: dict, arch: str, override: str | None = None) -> str:
    """The objective the model was trained for: flag > ``v_pred`` key > ``<name>.yaml`` > arch default."""
    if override:
        if override not in PREDICTION_TYPES:
            raise ValueError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {override!r}")
        return override
    if "v_pred" in keys:
        return "v_prediction"
    yaml = Path(path).with_suffix(".yaml")
    if yaml.is_file():
        m = re.search(r"^\s*parameterization:\s*['\"]?(\w+)", yaml.read_text(errors="replace"), re.M)
        if m:
            return "v_prediction" if m.group(1) == "v" else "epsilon"
    default = _extras()[arch]["scheduler"]["prediction_type"]
    if arch == "sd21":
        logging.getLogger("quantdream").info(
            "%s: an SD-2.x file with no v_pred key or .yaml beside it: assuming %s (SD-2.x at 768 px); pass "
            "--prediction-type epsilon for a 512 px base model", Path(path).name, default)
    return default


@lru_cache(maxsize=None)
def _bpe() -> tuple[dict, list]:
    from .vocab import bytes_to_unicode
    merges = [tuple(m.split()) for m in gzip.open(BPE, "rt", encoding="utf-8").read().splitlines() if m]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                       "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's tokenizer (49,408 tokens, 77 positions) from the BPE merges the package ships; SD-2.x and
    SDXL's second encoder (OpenCLIP) pad with ``!``."""
    from transformers import CLIPTokenizer
    vocab, merges = _bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


def _component(arch: str, name: str) -> dict:
    spec = json.loads((Path(ARCH_DIR) / f"{arch}.json").read_text())
    if name not in spec:
        raise ValueError(f"no {name} config for {arch} in {ARCH_DIR}")
    return spec[name]


def write_config_folder(arch: str, dst: Path) -> Path:
    """A diffusers folder without weights (model_index.json and each model's config.json), the
    ``config=`` that ``from_single_file`` reads instead of the hub."""
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    index = {"_class_name": pipeline_name(arch), "_diffusers_version": "0.0.0",
             "scheduler": ["diffusers", _extras()[arch]["scheduler"]["_class_name"]]}
    for tok in _extras()[arch]["tokenizers"]:
        index[tok] = ["transformers", "CLIPTokenizer"]
    if arch != "sdxl":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    for name in names:
        entry = _component(arch, name)
        index[name] = [entry["library"], entry["class"]]
        config = dict(entry["config"])
        if entry["library"] == "transformers":
            config.update(architectures=[entry["class"]], model_type="clip_text_model")
        else:
            config["_class_name"] = entry["class"]
        (dst / name).mkdir(parents=True, exist_ok=True)
        (dst / name / "config.json").write_text(json.dumps(config, indent=1))
    (dst / "model_index.json").write_text(json.dumps(index, indent=1))
    return dst


def load(path: Path, prediction: str | None = None, **kw):
    """The SD / SDXL pipeline's ``from_single_file`` offline, with the package's configs, scheduler and tokenizers."""
    from diffusers import schedulers
    keys = read_keys(path)
    arch = detect(keys, path)
    sched = dict(_extras()[arch]["scheduler"])
    sched["prediction_type"] = prediction_type(path, keys, arch, prediction)
    scheduler = getattr(schedulers, sched.pop("_class_name")).from_config(sched)
    toks = {name: clip_tokenizer(pad) for name, pad in _extras()[arch]["tokenizers"].items()}
    if arch == "sdxl":
        kw = {k: v for k, v in kw.items() if k not in ("safety_checker", "requires_safety_checker")}
    with tempfile.TemporaryDirectory(prefix="quantdream-config-") as tmp:
        config = write_config_folder(arch, Path(tmp))
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
        return cls.from_single_file(str(path), config=str(config), local_files_only=True, scheduler=scheduler,
                                    **toks, **kw)
