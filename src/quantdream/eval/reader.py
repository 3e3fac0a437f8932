"""The attribute reader: a small CNN that reads every caption attribute back from a 64x64 world image.

Its own architecture (plain conv stages, nothing from diffusers), seed and data draw, so it shares no
weights or data stream with the generator it judges. One shared trunk, one linear head per attribute:

    n_objects (1/2), class, colour      -- of objects[0]: the only object, or the LEFT one of two
    size, position                      -- single-object scenes only
    bg_pattern, bg_colour
    class2, colour2                     -- the RIGHT object of two-object scenes only

(In ``render``, two-object scenes place objects[0] at x = 27% and objects[1] at x = 73%, so the first
object a caption names, "a X next to a Y", is the left one.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantdream.world.render import CLASSES, COLOUR_NAMES, PATTERNS, POSITIONS, SIZES, Scene

# head name -> label names; the order of HEADS is the order of the logits
HEADS: dict[str, list[str]] = {
    "n_objects": ["1", "2"], "class": CLASSES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITIONS,
    "bg_pattern": PATTERNS, "bg_colour": COLOUR_NAMES, "class2": CLASSES, "colour2": COLOUR_NAMES,
}
SINGLE_ONLY = ("size", "position")
PAIR_ONLY = ("class2", "colour2")
IGNORE = -100  # target of a head that does not apply to a scene (cross_entropy's ignore_index)


@dataclass(frozen=True)
class ReaderConfig:
    widths: tuple[int, ...] = (16, 32, 64, 128)  # stem width, then one stride-2 stage per entry after it
    hidden: int = 256  # width of the shared fully connected layer
    dropout: float = 0.1  # before the heads

    @staticmethod
    def from_dict(d: dict) -> "ReaderConfig":
        return ReaderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def contrast_channels(x: torch.Tensor) -> torch.Tensor:
    """Two colour-blind cues appended to RGB: (B, 3, H, W) -> (B, 5, H, W).

    1. Sobel gradient magnitude summed over RGB (the outline, whatever the colours);
    2. distance of each pixel from the image's median colour (the object against a plain-ish background).
    Without them a small CNN must first learn colour-invariant edges from random object/background colour
    pairs; measured here: class accuracy stayed at chance for 200 steps of 64 scenes, vs 70% with a fixed
    white-on-black colouring."""
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    k = torch.stack([kx, kx.T])[:, None].repeat(3, 1, 1, 1)  # (6, 1, 3, 3): d/dx, d/dy per channel
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)  # (B, 6, H, W)
    edge = g.pow(2).sum(1, keepdim=True).add(1e-6).sqrt()  # (B, 1, H, W)
    med = x.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    dist = (x - med).pow(2).sum(1, keepdim=True).add(1e-6).sqrt()  # (B, 1, H, W)
    return torch.cat([x, edge, dist], 1)


class ConvTrunk(nn.Module):
    """64x64 image -> one feature vector that keeps both *what* and *where*:

        F = conv stages (B, C, 8, 8)
        [ flatten(conv_s2(F)) (16C) | avg, max over F (2C) | avg, max over F's left half (2C) | ... right half (2C) ]

    The pooled parts make class/colour translation-invariant (an object looks the same at any of the 9
    positions); the halves serve the left/right objects of two-object scenes; the 4x4 map gives position
    and size. Shared by the reader and the world-CLIP image tower (separate weights)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers = [conv_bn(5, widths[0])]  # (B, w0, 64, 64), from RGB + contrast_channels
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [conv_bn(c_in, c_out, 2), conv_bn(c_out, c_out)]  # halves H, W
        self.net = nn.Sequential(*layers)  # (B, C, 8, 8) for 3 stages
        c, side = widths[-1], 64 // 2 ** (len(widths) - 1)
        self.down = conv_bn(c, c, 2)  # (B, C, side/2, side/2)
        self.out_dim = c * (side // 2) ** 2 + 6 * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(contrast_channels(x))  # (B, C, S, S)
        half = f.shape[-1] // 2
        pooled = [torch.cat([g.mean((2, 3)), g.amax((2, 3))], 1) for g in (f, f[..., :half], f[..., half:])]
        return torch.cat([self.down(f).flatten(1), *pooled], 1)  # (B, out_dim)


class AttributeReader(nn.Module):
    def __init__(self, config: ReaderConfig = ReaderConfig()) -> None:
        super().__init__()
        self.config = config
        self.trunk = ConvTrunk(config.widths)
        self.fc = nn.Sequential(nn.Linear(self.trunk.out_dim, config.hidden), nn.ReLU(inplace=True),
                                nn.Dropout(config.dropout))
        self.heads = nn.ModuleDict({k: nn.Linear(config.hidden, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1] -> {head: logits (B, n_labels)}."""
        h = self.fc(self.trunk(x))
        return {k: head(h) for k, head in self.heads.items()}


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Integer targets (B,) per head; IGNORE where a head does not apply to the scene."""
    t = {k: np.full(len(scenes), IGNORE, dtype=np.int64) for k in HEADS}
    for i, s in enumerate(scenes):
        o = s.objects[0]
        t["n_objects"][i] = len(s.objects) - 1
        t["class"][i], t["colour"][i] = o.cls, o.colour
        t["bg_pattern"][i], t["bg_colour"][i] = s.bg_pattern, s.bg_colour
        if len(s.objects) == 1:
            t["size"][i], t["position"][i] = s.size, s.position
        else:
            t["class2"][i], t["colour2"][i] = s.objects[1].cls, s.objects[1].colour
    return {k: torch.from_numpy(v) for k, v in t.items()}


def reader_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                label_smoothing: float = 0.05) -> torch.Tensor:
    """Sum over heads of the cross-entropy, each averaged over the scenes the head applies to."""
    total = logits["class"].new_zeros(())
    for k, z in logits.items():
        y = targets[k]
        if (y != IGNORE).any():
            total = total + F.cross_entropy(z, y, ignore_index=IGNORE, label_smoothing=label_smoothing)
    return total


def decode(logits: dict[str, torch.Tensor]) -> list[dict]:
    """Logits -> one attribute dict per image, shaped like ``Scene.attributes()``: size/position when
    one object is read, class2/colour2 when two are."""
    idx = {k: z.argmax(1).tolist() for k, z in logits.items()}
    out = []
    for i in range(len(idx["class"])):
        n = idx["n_objects"][i] + 1
        rec = {"n_objects": n}
        for k in ("class", "colour", "bg_pattern", "bg_colour") + (SINGLE_ONLY if n == 1 else PAIR_ONLY):
            rec[k] = HEADS[k][idx[k][i]]
        out.append(rec)
    return out
