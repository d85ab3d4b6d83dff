"""Stochastic similarity filter: skip rate, max_skip, changed frames, statistics with a fixed seed."""

from __future__ import annotations

import numpy as np
import pytest
from ditstream.engine.config import FilterConfig
from ditstream.engine.similarity import SimilarityFilter, cosine, features, skip_probability


def _img(value: int = 100, seed: int = 0) -> np.ndarray:
    rs = np.random.RandomState(seed)
    return np.clip(rs.normal(value, 30, (64, 64, 3)), 0, 255).astype(np.uint8)


def test_skip_probability_formula():
    assert skip_probability(1.0, 0.98) == 1.0
    assert skip_probability(0.98, 0.98) == 0.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5)
    assert skip_probability(0.5, 0.98) == 0.0


def test_identical_frames_skip_but_never_more_than_max_skip():
    f = SimilarityFilter(FilterConfig(enabled=True, threshold=0.98, max_skip=4, seed=1))
    img = _img()
    decisions = [f.should_skip(img) for _ in range(50)]
    assert decisions[0] is False
    run = longest = 0
    for d in decisions:
        run = run + 1 if d else 0
        longest = max(longest, run)
    assert longest == 4  # identical frames always skip up to the cap, then one is processed
    assert sum(decisions) == 40  # pattern: process, skip×4, process, ...


def test_skip_rate_matches_probability_statistically():
    """Frames at similarity c skip with probability 1-(1-c)/(1-η); binomial 5-sigma bound, fixed seed."""
    base = _img(seed=3)
    noisy = np.clip(base.astype(int) + np.random.RandomState(4).randint(-12, 13, base.shape), 0, 255).astype(np.uint8)
    c = cosine(features(base, 32), features(noisy, 32))
    eta = 0.98
    p = skip_probability(c, eta)
    assert 0.2 < p < 0.95, f"test frames should sit in the stochastic band, got c={c}, p={p}"
    f = SimilarityFilter(FilterConfig(enabled=True, threshold=eta, max_skip=1000, seed=123))
    trials = 2000
    skips = 0
    for _ in range(trials):
        f.reset()
        assert f.should_skip(base) is False  # the reference is always processed
        skips += f.should_skip(noisy)
    rate = skips / trials
    sigma = (p * (1 - p) / trials) ** 0.5
    assert abs(rate - p) < 5 * sigma + 0.01


def test_changed_frame_is_processed_and_disabled_filter_never_skips():
    f = SimilarityFilter(FilterConfig(enabled=True, threshold=0.98, max_skip=10, seed=0))
    a, b = _img(60, seed=1), _img(200, seed=2)
    assert f.should_skip(a) is False
    assert f.should_skip(b) is False  # very different → processed
    off = SimilarityFilter(FilterConfig(enabled=False))
    assert not any(off.should_skip(a) for _ in range(20))


def test_same_seed_same_decisions():
    img = _img()
    noisy = np.clip(img.astype(int) + 6, 0, 255).astype(np.uint8)
    seqs = []
    for _ in range(2):
        f = SimilarityFilter(FilterConfig(enabled=True, threshold=0.9, max_skip=3, seed=42))
        seqs.append([f.should_skip(img if i % 2 else noisy) for i in range(40)])
    assert seqs[0] == seqs[1]
