"""A seeded, resumable stream of freshly rendered world scenes (the evaluator's own data draw)."""
from __future__ import annotations

import numpy as np

from quantdream.world.fmnist import load_fmnist
from quantdream.world.render import Scene, render_batch, sample_scene

EVAL_SEED = 1234  # the evaluator's seed; the generator uses 0 and 1


class SceneStream:
    """Random scenes of one Fashion-MNIST split, rendered on the fly.

    The numpy generator is the only source of randomness; ``state()``/``set_state()`` round-trip it
    through a checkpoint so a resumed run draws the same scenes it would have drawn.
    """

    def __init__(self, split: str = "train", seed: int = EVAL_SEED, fmnist_dir: str | None = None) -> None:
        self.split = split
        self.items, self.labels = load_fmnist(split, fmnist_dir)
        self.rng = np.random.default_rng(seed)

    def scenes(self, n: int, **kwargs) -> list[Scene]:
        return [sample_scene(self.rng, self.labels, split=self.split, **kwargs) for _ in range(n)]

    def render(self, scenes: list[Scene]) -> np.ndarray:
        """uint8 (N, 64, 64, 3)."""
        return render_batch(scenes, self.items)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
