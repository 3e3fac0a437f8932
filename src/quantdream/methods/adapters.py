"""Apply any method's output to a loaded StableDiffusionPipeline (``quantdream generate --adapter``).

    learned_embeds.safetensors / A1111 .pt        pipe.load_textual_inversion           (ti, zoodip, gf-ti)
    pytorch_lora_weights.safetensors              pipe.load_lora_weights                 (lora, qlora)
    unet/ (a diffusers UNet folder)               UNet2DConditionModel.from_pretrained   (dreambooth)
    scales.safetensors                            quantize the UNet as the run did, then quant.load_scales,
                                                  whose forward pre-hook picks the scale set by timestep
                                                  (peqa, tuneqdm, tuneqdm-s1, tuneqdm-s2)

``path`` is a run folder (read through its adapter.json or the file names above) or one of the files.
Every check runs before the pipeline is changed. Returns {"kind", "prompt_text", "tokens"}.
NOTE: a QLoRA adapter is applied to the pipeline's own (float) UNet, as stock diffusers does.
"""
from __future__ import annotations

import json
from pathlib import Path

from .gradient import ADAPTER_JSON
from .lora import LORA_WEIGHTS
from .peqa import SCALES_FILE

EMBEDS = "learned_embeds.safetensors"


def _scales_meta(path: Path) -> dict | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    return meta if meta.get("format") == "quantdream-scales" else None


def detect(path: str | Path) -> tuple[str, Path, dict]:
    """(kind, file or folder to load, adapter.json contents or {})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--adapter {str(path)!r} does not exist")
    info: dict = {}
    if path.is_dir():
        if (path / ADAPTER_JSON).is_file():
            info = json.loads((path / ADAPTER_JSON).read_text())
            return info["kind"], path / info["path"], info
        for name, kind in ((LORA_WEIGHTS, "lora"), (SCALES_FILE, "scales"), (EMBEDS, "embedding")):
            if (path / name).is_file():
                return kind, path / name, info
        if (path / "unet" / "config.json").is_file():
            return "unet", path / "unet", info
        if (path / "config.json").is_file() and "UNet" in json.loads((path / "config.json").read_text()).get("_class_name", ""):
            return "unet", path, info
        raise ValueError(f"--adapter {str(path)!r}: no {ADAPTER_JSON}, {LORA_WEIGHTS}, {SCALES_FILE}, {EMBEDS} or "
                         f"unet/ inside; give a quantdream personalize output folder or one of those files")
    if (path.parent / ADAPTER_JSON).is_file():
        info = json.loads((path.parent / ADAPTER_JSON).read_text())
    if path.suffix == ".pt":
        return "embedding", path, info
    if path.suffix != ".safetensors":
        raise ValueError(f"--adapter {str(path)!r} is neither a folder nor a .safetensors / .pt file")
    if _scales_meta(path) is not None:
        return "scales", path, info
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any("lora" in k for k in keys):
        return "lora", path, info
    return "embedding", path, info


def apply_adapter(pipe, path: str | Path) -> dict:
    """Apply the adapter at ``path`` to ``pipe`` in place (see the module docstring)."""
    kind, target, info = detect(path)
    out = {"kind": kind, "prompt_text": info.get("prompt_text", ""), "tokens": []}
    if kind == "embedding":
        from ..export import check_embedding_fits
        from ..models.sdxl import load_into_pipeline
        widths = [te.get_input_embeddings().weight.shape[1] for te in
                  (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if te is not None]
        check_embedding_fits(target, widths, "--adapter")
        out["tokens"] = load_into_pipeline(pipe, target)
        out["prompt_text"] = out["prompt_text"] or (out["tokens"][0] if out["tokens"] else "")
    elif kind == "lora":
        pipe.load_lora_weights(str(target.parent if target.is_file() else target),
                               weight_name=target.name if target.is_file() else None)
    elif kind == "unet":
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(str(target))
        if unet.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
            raise ValueError(f"--adapter {str(path)!r}: UNet cross-attention width {unet.config.cross_attention_dim} "
                             f"does not match this model's {pipe.unet.config.cross_attention_dim}")
        pipe.unet = unet.to(pipe.device, pipe.unet.dtype)
    elif kind == "scales":
        apply_scales(pipe.unet, target)
    else:
        raise ValueError(f"--adapter {str(path)!r}: unknown kind {kind!r} in {ADAPTER_JSON}")
    return out


def apply_scales(unet, path: Path):
    """Quantize ``unet`` as recorded in the scale file (int8 / int4, one group per row) and load the
    scales; S1/S2/TAS files install the timestep hook. Returns the ScaleSelector."""
    from ..quant import load_scales, quantize_model, quantized_layers
    meta = _scales_meta(path)
    if meta is None:
        raise ValueError(f"{str(path)!r} is not a quantdream scales file")
    if not list(quantized_layers(unet)):
        weights = meta.get("quantdream_weights", "int8")
        quantize_model(unet, weights, group_size=int(meta.get("quantdream_group_size", 0)))
    return load_scales(unet, path)


WEIGHT_METHODS = ("dreambooth", "lora", "qlora", "peqa", "tuneqdm", "tuneqdm-s1", "tuneqdm-s2")


def base_weights(weights: str) -> str:
    """The base a weight method's output renders on (and ``evaluate --baseline`` scores as its floor), for a
    run trained at ``weights``: DreamBooth and LoRA on the float model they trained; a QLoRA adapter on the float
    UNet (stock ``load_lora_weights``); a scale file on a float pipeline whose UNet alone is quantized
    (:func:`apply_scales`), as PEQA / TuneQDM train."""
    return "none" if weights in ("none", "nf4") else f"{weights}-unet"


def load_base(method: str, model: str, weights: str, device: str = "cpu", dtype=None):
    """That base with nothing learned applied: ``model`` loaded, then the method's own ``prepare_model``
    (the scale methods quantize the UNet) when the base is not float."""
    import torch
    from ..models.load import load_pipeline
    from . import method_class
    pipe = load_pipeline(model, device=device, dtype=dtype or torch.float32)
    if base_weights(weights) != "none":
        method_class(method).prepare_model(pipe.text_encoder, pipe.vae, pipe.unet, weights, None)
    return pipe


def load_applied(model: str, run_dir: str | Path, device: str = "cpu", dtype=None):
    """``model`` loaded with the run's output applied (:func:`apply_adapter`)."""
    import torch
    from ..models.load import load_pipeline
    pipe = load_pipeline(model, device=device, dtype=dtype or torch.float32)
    apply_adapter(pipe, run_dir)
    return pipe
