"""Feature extractors of the world evaluator, loaded from the package (no network).

    ev = load_evaluator()
    ev.read(images)        -> list of attribute dicts (like ``Scene.attributes()``)
    ev.clip_image(images)  -> (N, 256) unit-norm world-CLIP image features
    ev.clip_text(prompts)  -> (N, 256) unit-norm world-CLIP text features
    ev.effnet(images)      -> (N, 1280) EfficientNet-Lite0 features (needs quantdream[eval])

``images``: uint8 numpy (N, 64, 64, 3) / (64, 64, 3), PIL image(s), or a float tensor (N, 3, H, W) in
[-1, 1]; see ``quantdream.eval.images``. The metrics (``quantdream.eval.metrics``) are pure functions of
what these return. Each network is loaded on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .images import ImageInput, to_tensor
from .io import ASSET_DIR, load_weights, read_config


class Evaluator:
    def __init__(self, directory: str | Path = ASSET_DIR, batch_size: int = 256) -> None:
        self.directory = Path(directory)
        self.batch_size = batch_size
        self._reader = self._clip = self._effnet = self._tokenizer = None
        self._classifier: object = False          # False: not looked for yet; None: the folder has none

    # -- networks, loaded lazily
    @property
    def reader(self):
        if self._reader is None:
            from .reader import AttributeReader, ReaderConfig
            cfg = ReaderConfig.from_dict(read_config(self.directory, "reader")["config"])
            self._reader = load_weights(AttributeReader(cfg), self.directory, "reader")
        return self._reader

    @property
    def classifier(self):
        """The class reader on object crops (eval.classifier), or None where the folder has none."""
        if self._classifier is False:
            self._classifier = None
            if (self.directory / "classifier.safetensors").is_file():
                from .classifier import ClassifierConfig, CropClassifier
                cfg = ClassifierConfig.from_dict(read_config(self.directory, "classifier")["config"])
                self._classifier = load_weights(CropClassifier(cfg), self.directory, "classifier")
        return self._classifier

    @property
    def clip(self):
        if self._clip is None:
            from transformers import CLIPTokenizer

            from quantdream.models.embedded import TOKENIZER_DIR

            from .worldclip import WorldClip, WorldClipConfig
            cfg = WorldClipConfig.from_dict(read_config(self.directory, "clip")["config"])
            self._tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
            if len(self._tokenizer) > cfg.vocab_size:  # e.g. a placeholder token added to a shared tokenizer
                raise ValueError(f"the tokenizer has {len(self._tokenizer)} tokens but world CLIP knows {cfg.vocab_size}")
            self._clip = load_weights(WorldClip(cfg), self.directory, "clip")
        return self._clip

    @property
    def effnet_model(self):
        if self._effnet is None:
            from .effnet import EffNetFeatures
            self._effnet = EffNetFeatures()
        return self._effnet

    def _batches(self, images: ImageInput):
        x = to_tensor(images)
        return x.split(self.batch_size)

    # -- extractors
    @torch.no_grad()
    def read_logits(self, images: ImageInput) -> dict[str, torch.Tensor]:
        """{head: logits (N, n_labels)} of the attribute reader (heads in ``reader.HEADS``); class and
        class2 from the class reader on object crops where the folder has one (eval.classifier)."""
        from .classifier import with_crop_classes
        outs = [self.reader(x) if self.classifier is None else with_crop_classes(self.reader(x), x, self.classifier)
                for x in self._batches(images)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def read(self, images: ImageInput) -> list[dict]:
        """One attribute dict per image: n_objects, class, colour, bg_pattern, bg_colour, and size/position
        (one object read) or class2/colour2 (two objects: class/colour are the left one)."""
        from .reader import decode
        return decode(self.read_logits(images))

    @torch.no_grad()
    def clip_image(self, images: ImageInput) -> torch.Tensor:
        """Unit-norm world-CLIP image features (N, D)."""
        return torch.cat([self.clip.encode_image(x) for x in self._batches(images)])

    @torch.no_grad()
    def clip_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Unit-norm world-CLIP text features (N, D) of any prompts (truncated to 32 tokens)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        model = self.clip
        tok = self._tokenizer(list(prompts), padding="max_length", max_length=model.config.max_length,
                              truncation=True, return_tensors="pt")
        return model.encode_text(tok.input_ids, tok.attention_mask)

    def effnet(self, images: ImageInput) -> torch.Tensor:
        """EfficientNet-Lite0 pooled features (N, 1280); raises ImportError naming the pip packages if missing."""
        return self.effnet_model(images)


def load_evaluator(directory: str | Path = ASSET_DIR) -> Evaluator:
    """The packaged world evaluator (weights under ``quantdream/assets/evaluator``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no evaluator folder at {directory}; train one with "
                                "`python -m quantdream.eval.train_evaluator reader` and `... clip`")
    return Evaluator(directory)
