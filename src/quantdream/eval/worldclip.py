"""World CLIP: a small contrastive image/text encoder pair, so CLIP-I and CLIP-T can be computed in the
world the way the papers compute them with CLIP ViT-B/32.

- Image tower: conv trunk (as the reader's, separate weights) -> linear -> ``embed_dim``.
- Text tower: token + position embeddings -> pre-LN transformer -> LayerNorm at the EOS token -> linear
  (CLIP's pooling). It reads the embedded model's CLIP-format tokenizer, so any prompt is accepted;
  words outside the world's grammar split into sub-word pieces, as in CLIP.

Trained (``train_evaluator clip``) with CLIP's symmetric InfoNCE on (render, caption) pairs, captions
with randomly dropped parts (so partial prompts embed sensibly), plus an instance term: two renders of
the same object (same item, colouring, print) in different scenes are pulled together, so CLIP-I
measures subject identity, which is what personalization papers use it for.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .reader import ConvTrunk


@dataclass(frozen=True)
class WorldClipConfig:
    embed_dim: int = 256  # shared image/text embedding width
    image_widths: tuple[int, ...] = (16, 32, 64, 128)  # conv trunk, as ReaderConfig.widths
    vocab_size: int = 1722  # the embedded tokenizer's vocabulary
    max_length: int = 32  # tokens, as the embedded model
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_ff: int = 512

    @staticmethod
    def from_dict(d: dict) -> "WorldClipConfig":
        return WorldClipConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        return asdict(self)


class ImageTower(nn.Module):
    def __init__(self, c: WorldClipConfig) -> None:
        super().__init__()
        self.trunk = ConvTrunk(c.image_widths)
        self.proj = nn.Sequential(nn.Linear(self.trunk.out_dim, 2 * c.embed_dim), nn.ReLU(inplace=True),
                                  nn.Linear(2 * c.embed_dim, c.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x))  # (B, embed_dim), not normalized


class TextTower(nn.Module):
    def __init__(self, c: WorldClipConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.text_width)
        self.pos = nn.Parameter(torch.randn(c.max_length, c.text_width) * 0.01)
        layer = nn.TransformerEncoderLayer(c.text_width, c.text_heads, c.text_ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.text_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(c.text_width)
        self.proj = nn.Linear(c.text_width, c.embed_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> (B, embed_dim), not normalized."""
        t = int(attention_mask.sum(1).max())  # drop all-padding columns: they cost time and change nothing
        ids, mask = input_ids[:, :t], attention_mask[:, :t]
        h = self.tok(ids) + self.pos[:t]  # (B, T, W)
        h = self.blocks(h, src_key_padding_mask=mask == 0)
        eos = mask.sum(1) - 1  # index of the EOS token (pad == eos in CLIP's tokenizer, so use the mask)
        return self.proj(self.ln(h[torch.arange(len(h)), eos]))


class WorldClip(nn.Module):
    def __init__(self, config: WorldClipConfig = WorldClipConfig()) -> None:
        super().__init__()
        self.config = config
        self.image = ImageTower(config)
        self.text = TextTower(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 64, 64) in [-1, 1] -> unit-norm (B, embed_dim)."""
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokenized prompts (B, T) -> unit-norm (B, embed_dim)."""
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3). img, txt: unit-norm (B, D), row i paired."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
    labels = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def instance_loss(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same objects (SimCLR-style). a, b: unit-norm (B, D)."""
    logits = a @ b.T / tau
    labels = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
