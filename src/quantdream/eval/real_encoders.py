"""Real CLIP and DINO encoders from local transformers folders (nothing is downloaded).

    clip = RealClip("/models/clip-vit-base-patch32")     # a CLIPModel folder: config.json, weights,
    clip.image(images) -> (N, D); clip.text(prompts) -> (N, D)   #   tokenizer, preprocessor_config.json
    dino = RealDino("/models/dinov2-small")              # Dinov2Model / ViTModel (DINO v1) folder
    dino.image(images) -> (N, D)                          # the CLS token of the last layer

DreamBooth (Ruiz et al. 2023, §4.1) uses CLIP ViT-B/32 for CLIP-I / CLIP-T and DINO ViT-S/16 for DINO;
``name`` says which model a number came from, so the report can state the variant beside it.
Every folder is checked (exists, is a folder, ``config.json`` of the right ``model_type``, a preprocessor
config) before any weights are read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

CLIP_TYPES = ("clip",)
DINO_TYPES = ("dinov2", "dinov2_with_registers", "vit")


def _check_folder(path: str | Path, flag: str, types: tuple[str, ...], what: str) -> dict:
    """config.json of a local transformers folder whose model_type is one of ``types``; clear errors otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{flag} {str(p)!r} does not exist; give a local transformers {what} folder "
                                f"(nothing is downloaded)")
    if not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a file; give the {what} folder that holds config.json")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        found = sorted(x.name for x in p.iterdir())[:8]
        raise ValueError(f"{flag} {str(p)!r} is not a transformers {what} folder: no config.json (it holds {found})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: {cfg_path} is not valid JSON ({e})") from None
    kind = cfg.get("model_type")
    if kind not in types:
        raise ValueError(f"{flag} {str(p)!r} holds a {kind!r} model, not a {what} "
                         f"(config.json model_type must be {' or '.join(map(repr, types))})")
    if not (p / "preprocessor_config.json").is_file():
        raise ValueError(f"{flag} {str(p)!r} has no preprocessor_config.json; save the model's image processor "
                         f"into the folder (processor.save_pretrained(folder))")
    return cfg


def check_clip_folder(path: str | Path) -> dict:
    return _check_folder(path, "--clip", CLIP_TYPES, "CLIP (CLIPModel)")


def check_dino_folder(path: str | Path) -> dict:
    return _check_folder(path, "--dino", DINO_TYPES, "DINO (Dinov2Model / ViTModel)")


def _variant(cfg: dict, path: Path) -> str:
    """'ViT-B/32 (folder-name)' from a vision config."""
    v = cfg.get("vision_config", cfg)
    size = {384: "S", 768: "B", 1024: "L", 1280: "H"}.get(v.get("hidden_size"), str(v.get("hidden_size")))
    return f"ViT-{size}/{v.get('patch_size', '?')} ({path.name})"


def _pooled(out) -> torch.Tensor:
    """transformers 4.x returns a tensor from get_*_features, 5.x a ModelOutput with the projection pooled."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pil(images) -> list[Image.Image]:
    from .images import to_tensor
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
        return [im.convert("RGB") for im in images]
    x = ((to_tensor(images, res=224) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in x]


class RealClip:
    """A transformers CLIPModel from a local folder: unit-norm image and text features."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32) -> None:
        cfg = check_clip_folder(path)
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        self.path = Path(path).expanduser()
        self.name = "CLIP " + _variant(cfg, self.path)
        self.model = CLIPModel.from_pretrained(str(self.path), local_files_only=True).eval().to(device)
        self.processor = CLIPImageProcessor.from_pretrained(str(self.path), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def image(self, images) -> torch.Tensor:
        ims = _pil(images)
        out = []
        for k in range(0, len(ims), self.batch_size):
            px = self.processor(images=ims[k:k + self.batch_size], return_tensors="pt").pixel_values.to(self.device)
            out.append(_pooled(self.model.get_image_features(pixel_values=px)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                           attention_mask=tok.attention_mask.to(self.device))
        return torch.nn.functional.normalize(_pooled(out).float().cpu(), dim=-1)


class RealDino:
    """DINOv2 (or a DINO v1 ViT) from a local folder: the last layer's CLS token, unit norm."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32) -> None:
        cfg = check_dino_folder(path)
        from transformers import AutoImageProcessor, AutoModel
        self.path = Path(path).expanduser()
        self.name = ("DINOv2 " if cfg["model_type"].startswith("dinov2") else "DINO ") + _variant(cfg, self.path)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval().to(device)
        self.processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def image(self, images) -> torch.Tensor:
        ims = _pil(images)
        out = []
        for k in range(0, len(ims), self.batch_size):
            px = self.processor(images=ims[k:k + self.batch_size], return_tensors="pt").pixel_values.to(self.device)
            out.append(self.model(pixel_values=px).last_hidden_state[:, 0].float().cpu())  # (n, D) CLS
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)
