"""The class reader: names an object's class from a crop of it, for the attribute reader's class heads.

The attribute reader reads every attribute from the whole 64x64 image with one small trunk; it finds
objects (position 0.998, size 1.0) but names their class poorly (0.68 on test renders): prints,
patterned backgrounds and a 22 px object leave little of the silhouette in its pooled features. Here
the object is cut out first, where the reader says it is, and a CNN of its own sees only the object:

    box  = object_boxes(n_objects, size, position)          (the renderer's geometry, world.render)
    crop = the box + 4 px on each side (jitter, shifts), resampled to 32x32 (bilinear)
    class logits = sum over side offsets d in SIDE_TTA of log_softmax(CropClassifier(crop at side + d))
                                                              (replaces the reader's class / class2)

Trained on crops at the true geometry (`python -m quantdream.eval.train_evaluator classifier`);
optional: an evaluator folder without ``classifier.safetensors`` reads classes with the reader alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantdream.world.render import RES, Scene, object_boxes

from .reader import conv_bn, contrast_channels

CROP = 32      # crop side after resampling
MARGIN = 4     # pixels around the box: the renderer jitters by +-2 px, the evaluator's augmentation by 2 more
SIDE_TTA = (0, -2, 2)  # reading: log-probabilities summed over crops this much tighter/looser (+0.6 points of
#                        class accuracy on 2000 test renders over the plain crop; horizontal flips cost 2.3)


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, ...] = (32, 64, 128)  # stem width, then one stride-2 stage per entry after it
    dropout: float = 0.2

    @staticmethod
    def from_dict(d: dict) -> "ClassifierConfig":
        return ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        return asdict(self)


class CropClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        layers = [conv_bn(5, w[0]), conv_bn(w[0], w[0])]
        for c_in, c_out in zip(w[:-1], w[1:]):
            layers += [conv_bn(c_in, c_out, 2), conv_bn(c_out, c_out)]
        self.net = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(2 * w[-1], 10))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops (N, 3, 32, 32) in [-1, 1] -> class logits (N, 10)."""
        f = self.net(contrast_channels(crops))
        return self.fc(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))


def crop_objects(images: torch.Tensor, boxes: list[list[tuple[float, float, int]]]) -> tuple[torch.Tensor, list[int]]:
    """images (B, 3, 64, 64); boxes[i]: the (cx, cy, side) of image i's objects -> crops (N, 3, 32, 32)
    of every object in order, and the image index of each."""
    theta, owner = [], []
    for i, bs in enumerate(boxes):
        for cx, cy, side in bs:
            s = (side / 2 + MARGIN) / (RES / 2)
            theta.append([[s, 0.0, cx / (RES / 2) - 1], [0.0, s, cy / (RES / 2) - 1]])
            owner.append(i)
    theta_t = images.new_tensor(theta).view(-1, 2, 3)
    grid = F.affine_grid(theta_t, [len(owner), 3, CROP, CROP], align_corners=False)
    return F.grid_sample(images[owner], grid, align_corners=False, padding_mode="border"), owner


def scene_boxes(scenes: list[Scene]) -> list[list[tuple[float, float, int]]]:
    """The true boxes of each scene's objects (training)."""
    from quantdream.world.render import POSITIONS, SIZES
    return [object_boxes(len(s.objects), SIZES[s.size], POSITIONS[s.position]) for s in scenes]


def read_boxes(records: list[dict]) -> list[list[tuple[float, float, int]]]:
    """The boxes the attribute reader's own reading implies (``reader.decode`` records)."""
    return [object_boxes(r["n_objects"], r.get("size", "small"), r.get("position", "center")) for r in records]


def with_crop_classes(logits: dict[str, torch.Tensor], images: torch.Tensor, classifier: CropClassifier) -> dict:
    """The reader's logits with class (first / left object) and class2 (right object of two) replaced by
    the classifier's, on crops where the reader places the objects."""
    from .reader import decode
    boxes = read_boxes(decode(logits))
    z = 0
    for d in SIDE_TTA:
        crops, owner = crop_objects(images, [[(cx, cy, side + d) for cx, cy, side in bs] for bs in boxes])
        z = z + classifier(crops).log_softmax(1)
    out = dict(logits)
    out["class"], out["class2"] = logits["class"].clone(), logits["class2"].clone()
    seen: set[int] = set()
    for row, i in enumerate(owner):
        out["class2" if i in seen else "class"][i] = z[row]
        seen.add(i)
    return out
