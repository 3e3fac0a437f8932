"""Image inputs of the evaluator, and the augmentations its networks are trained with.

Every extractor accepts the same image types and converts them with :func:`to_tensor`:

- ``numpy.ndarray`` uint8, ``(N, H, W, 3)`` or one ``(H, W, 3)`` image, values 0..255
  (what ``quantdream.world.render_batch`` returns);
- ``PIL.Image.Image`` or a list of them (converted to RGB);
- ``torch.Tensor`` float, ``(N, 3, H, W)`` or ``(3, H, W)``, values in [-1, 1] (diffusers' convention,
  what a VAE decodes to); uint8 tensors in NHWC are accepted too.

Images that are not 64x64 are resized (bilinear, antialiased) to the world's resolution.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from quantdream.world.render import RES

ImageInput = Union[np.ndarray, torch.Tensor, Image.Image, Sequence[Image.Image]]


def to_tensor(images: ImageInput, res: int = RES) -> torch.Tensor:
    """Convert any accepted image input to float ``(N, 3, res, res)`` in [-1, 1] (see module docstring)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError(f"a list of images must hold PIL images, got {sorted({type(im).__name__ for im in images})}")
        images = np.stack([np.asarray(im.convert("RGB").resize((res, res), Image.BILINEAR)) for im in images])
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (N, H, W, 3) in 0..255, got dtype {images.dtype}; "
                            "pass floats as a torch tensor (N, 3, H, W) in [-1, 1]")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"unsupported image input {type(images).__name__}; expected uint8 numpy (N, H, W, 3), "
                        "PIL image(s) or a float tensor (N, 3, H, W) in [-1, 1]")
    x = images
    if x.dtype == torch.uint8:  # NHWC 0..255
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        x = x.float()
    if x.shape[-2:] != (res, res):
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous()


def _gaussian_kernel(sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(N, 2r+1) normalized 1-d Gaussian kernels, one per sigma."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of x (N, C, H, W) with one sigma per image (N,), reflect-padded."""
    n, c, h, w = x.shape
    k = _gaussian_kernel(sigma.clamp_min(1e-3))  # (N, K)
    r = k.shape[1] // 2
    y = x.reshape(1, n * c, h, w)
    kk = k.repeat_interleave(c, 0)  # (N*C, K)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), kk[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), kk[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Mild photometric/geometric noise so the evaluator stays reliable on generated images.

    x: (N, 3, H, W) in [-1, 1]. Per image: colour shift of up to +-4 levels per channel and +-3% gain,
    a 0-2 px shift (edge-replicated), with p=0.5 a Gaussian blur (sigma 0.3-1.1), with p=0.25 a 2x
    down/up-sample (what a 4x autoencoder's softness looks like), and Gaussian noise (std <= 3 levels).
    None of these changes a named attribute (positions differ by >= 9 px, colours by far more than 4 levels).
    """
    n, _, h, w = x.shape
    g = generator
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    s = strength
    # 1. colour: per-channel offset and a global gain
    x = x * (1 + s * 0.03 * (2 * u(n, 1, 1, 1) - 1)) + s * (4 / 127.5) * (2 * u(n, 3, 1, 1) - 1)
    # 2. shift by up to 2 px (replicate the edge, so no wrap-around)
    p = 2
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    dx = torch.randint(-p, p + 1, (n,), generator=g) if s > 0 else torch.zeros(n, dtype=torch.long)
    dy = torch.randint(-p, p + 1, (n,), generator=g) if s > 0 else torch.zeros(n, dtype=torch.long)
    x = torch.stack([xp[i, :, p - int(dy[i]): p - int(dy[i]) + h, p - int(dx[i]): p - int(dx[i]) + w] for i in range(n)])
    # 3. blur (p=0.5), or a 2x down/up-sample (p=0.25)
    r = u(n)
    do_blur = r < 0.5 * s
    if do_blur.any():
        x[do_blur] = blur(x[do_blur], 0.3 + 0.8 * u(int(do_blur.sum())))
    do_resample = (r >= 0.5 * s) & (r < 0.75 * s)
    if do_resample.any():
        small = F.interpolate(x[do_resample], scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        x[do_resample] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # 4. pixel noise
    x = x + s * (3 / 127.5) * u(n, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return x.clamp(-1.0, 1.0)
