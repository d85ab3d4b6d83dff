"""Stochastic similarity filter (per stream), after StreamDiffusion's SSF.

Near-duplicate inputs are skipped with probability ``max(0, 1 − (1 − c)/(1 − η))`` where ``c`` is
the cosine similarity between the new input and the last input actually processed; never more than
``max_skip`` in a row, so a static scene still refreshes. Seeded, so tests are reproducible.
"""

from __future__ import annotations

import random

import numpy as np
from ditstream.engine.config import FilterConfig


def features(image: np.ndarray, size: int) -> np.ndarray:
    """A small, centred-at-zero copy of an (H, W, 3) uint8 image, flattened (block means)."""
    h, w = image.shape[:2]
    sh, sw = max(1, h // size), max(1, w // size)
    hh, ww = (h // sh) * sh, (w // sw) * sw
    small = image[:hh, :ww].reshape(hh // sh, sh, ww // sw, sw, 3).mean(axis=(1, 3))
    return (small / 127.5 - 1.0).ravel()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denom == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / denom)


def skip_probability(similarity: float, threshold: float) -> float:
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


class SimilarityFilter:
    """Decides, frame by frame, whether to skip an input."""

    def __init__(self, config: FilterConfig, seed: int = 0) -> None:
        self.config = config
        self._rng = random.Random(config.seed if config.seed is not None else seed)
        self._last: np.ndarray | None = None
        self.consecutive = 0

    def reconfigure(self, config: FilterConfig) -> None:
        self.config = config
        if config.seed is not None:
            self._rng = random.Random(config.seed)

    def reset(self) -> None:
        """Forget the reference frame (e.g. after a size change); the random stream continues."""
        self._last = None
        self.consecutive = 0

    def should_skip(self, image: np.ndarray) -> bool:
        """True if this frame may be skipped; updates the reference when the frame is processed."""
        if not self.config.enabled:
            return False
        feat = features(image, self.config.downscale)
        if self._last is not None and feat.shape == self._last.shape and self.consecutive < self.config.max_skip:
            p = skip_probability(cosine(feat, self._last), self.config.threshold)
            if p > 0 and self._rng.random() < p:
                self.consecutive += 1
                return True
        self._last = feat
        self.consecutive = 0
        return False
