"""The user's reference photos: load, check, resize, encode once, sample (image, flip, caption).

Each image is turned upright by its EXIF orientation, center-cropped to a square and resized to the
model's resolution (bicubic; the diffusers DreamBooth script's Resize + CenterCrop, so a non-square
photo is not squashed; square photos are only resized, as in ZOODiP and the diffusers TI script);
16-bit and other wide-range modes are scaled to 8 bits, not clipped. It is then VAE-encoded once with and without a horizontal flip, and its latent distribution
(mean, std) cached; a training sample draws z = mean + std * N(0, I) from the cache, which is what
re-encoding every step (the reference) samples from, at a fraction of the cost.

Captions: the textual-inversion object or style templates, or one caption (or a list) per image
from a JSON file ``{"00.png": "a photo of a {} on a green background", ...}`` (the paper's
comprehensive captioning); ``{}`` marks where the token goes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .templates import OBJECT_TEMPLATES, STYLE_TEMPLATES

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"--images must be a folder of photos, but {str(folder)!r} is a file")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        others = sorted(p.name for p in folder.iterdir())[:5]
        raise ValueError(f"no images in {str(folder)!r} (looked for {', '.join(IMAGE_SUFFIXES)}); "
                         f"it contains {others or 'nothing'}")
    return paths


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's ``convert("RGB")`` clips the integer modes of 16-bit PNGs ("I;16", "I") at 255,
    which turns a photo white; those are scaled by their bit depth instead (65535 -> 255)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.max() <= 1.0 else (255.0 / 65535.0 if a.max() > 255 else 1.0)
        im = Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), "L")
    return im.convert("RGB")


def center_square(im: Image.Image) -> Image.Image:
    """The largest centred square (the diffusers DreamBooth script's CenterCrop after Resize)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side)) if (w, h) != (side, side) else im


def load_images(paths: list[Path], resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) float32 in [-1, 1]: upright (EXIF), 8-bit RGB, centre square,
    resized. A file that cannot be decoded is named."""
    from PIL import ImageOps
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = to_rgb(ImageOps.exif_transpose(im))
        except Exception as e:  # PIL raises several types for truncated / foreign files
            raise ValueError(f"cannot read image {p.name!r} in {str(p.parent)!r} ({type(e).__name__}: {e}); "
                             f"remove or replace that file") from None
        im = center_square(im).resize((resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def templates_for(learnable_property: str) -> list[str]:
    if learnable_property == "object":
        return list(OBJECT_TEMPLATES)
    if learnable_property == "style":
        return list(STYLE_TEMPLATES)
    raise ValueError(f"learnable property must be 'object' or 'style', got {learnable_property!r}")


def load_caption_file(path: str | Path, image_names: list[str]) -> dict[str, list[str]]:
    """{image file name: [caption with '{}', ...]} for every image; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"caption file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"caption file {str(path)!r} must map image file names to captions, "
                         f'e.g. {{"00.png": "a photo of a {{}} on a green background"}}')
    out = {}
    for name in image_names:
        caps = raw.get(name)
        if caps is None:
            raise ValueError(f"caption file {str(path)!r} has no caption for image {name!r}")
        caps = [caps] if isinstance(caps, str) else caps
        if not (isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps)):
            raise ValueError(f"caption for {name!r} in {str(path)!r} must be a string or a list of strings")
        for c in caps:
            if c.count("{}") != 1:
                raise ValueError(f"caption {c!r} for {name!r} must contain '{{}}' exactly once "
                                 f"(where the token goes)")
        out[name] = caps
    extra = sorted(set(raw) - set(image_names))
    if extra:
        logger.warning("caption file %s names images that are not in the folder: %s", path, extra)
    return out


@dataclass
class Batch:
    latents: torch.Tensor      # (B, C, h, w), scaled by the VAE's scaling factor
    captions: list[str]        # with the placeholder text in place of '{}'
    index: list[int]           # which image
    flipped: list[bool]


class SubjectImages:
    """Reference photos, their captions, and (after ``encode``) their cached latent distributions."""

    def __init__(self, folder: str | Path, resolution: int, captions: str | Path | None = None,
                 learnable_property: str = "object", flip_p: float = 0.5) -> None:
        self.paths = list_images(folder)
        self.names = [p.name for p in self.paths]
        self.pixels = load_images(self.paths, resolution)         # (N, 3, R, R)
        if captions is None:
            self.templates, self.per_image = templates_for(learnable_property), None
        else:
            self.templates, self.per_image = None, load_caption_file(captions, self.names)
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip probability must lie in [0, 1], got {flip_p}")
        self.flip_p = flip_p
        self.mean: torch.Tensor | None = None                     # (N, 2, C, h, w): [plain, flipped]
        self.std: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @torch.no_grad()
    def encode(self, vae, scaling_factor: float, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = False) -> None:
        """VAE-encode every image once, with and without a horizontal flip. One image per call: at 512 px
        a batch of all photos would set the run's memory peak (about 1.5 GB on SD-1.5). ``progress``: a
        tqdm bar (encoding takes minutes on a CPU at 512 px)."""
        from tqdm import tqdm
        means, stds = [], []
        bar = tqdm(total=2 * len(self), desc="encoding photos", unit="image", disable=not progress, leave=False)
        with torch.no_grad():
            for x in (self.pixels, self.pixels.flip(-1)):
                m, s = [], []
                for img in x:
                    dist = vae.encode(img[None].to(device=device, dtype=dtype)).latent_dist
                    m.append(dist.mean.float() * scaling_factor)
                    s.append(dist.std.float() * scaling_factor)
                    bar.update(1)
                means.append(torch.cat(m))
                stds.append(torch.cat(s))
        bar.close()
        self.mean = torch.stack(means, 1)
        self.std = torch.stack(stds, 1)

    def caption_choices(self, i: int) -> list[str]:
        return self.templates if self.per_image is None else self.per_image[self.names[i]]

    def sample(self, batch_size: int, generator: torch.Generator, placeholder_text: str) -> Batch:
        """Draw images, flips, captions and latent noise, all from ``generator`` (in that order per item)."""
        if self.mean is None:
            raise RuntimeError("call encode(vae, scaling_factor) before sampling")
        dev = generator.device
        lat, caps, idx, flips = [], [], [], []
        for _ in range(batch_size):
            i = int(torch.randint(len(self), (1,), generator=generator, device=dev))
            f = bool(torch.rand((), generator=generator, device=dev) < self.flip_p)
            choices = self.caption_choices(i)
            c = choices[int(torch.randint(len(choices), (1,), generator=generator, device=dev))]
            mean, std = self.mean[i, int(f)], self.std[i, int(f)]
            noise = torch.randn(mean.shape, generator=generator, device=dev).to(mean.device)
            lat.append(mean + std * noise)
            caps.append(c.format(placeholder_text))
            idx.append(i)
            flips.append(f)
        return Batch(latents=torch.stack(lat), captions=caps, index=idx, flipped=flips)
