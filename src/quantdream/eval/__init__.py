"""The world evaluator: extractors (attribute reader, world CLIP, EfficientNet-Lite0)
and metrics that are pure functions of their outputs.

    from quantdream.eval import load_evaluator, clip_i, clip_t, prompt_accuracy
    ev = load_evaluator()
    acc = prompt_accuracy(ev.read(images), named)           # named: from world.captions.caption
    s_i = clip_i(ev.clip_image(generated), ev.clip_image(reference))
    s_t = clip_t(ev.clip_image(generated), ev.clip_text([prompt]))
    s_dino = clip_i(ev.effnet(generated), ev.effnet(reference))   # the DINO column
"""
from .evaluator import Evaluator, load_evaluator
from .images import to_tensor
from .metrics import clip_i, clip_t, pairwise_cosine, prompt_accuracy, reader_accuracy, self_similarity

__all__ = ["Evaluator", "load_evaluator", "to_tensor", "clip_i", "clip_t", "pairwise_cosine", "prompt_accuracy",
           "reader_accuracy", "self_similarity"]
