"""``motion_adaptive``: the motion measure, its curve, and memory and feedback scaled by it per frame."""

from __future__ import annotations

import numpy as np
import pytest
from ditstream.engine import motion
from ditstream.engine.backends import create_backend
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.demo.temporal_quality import moving_clip
from ditstream.engine.generate import Generator
from ditstream.engine.types import Frame

SIZE = 32


def test_the_curve_is_full_up_to_low_off_from_high_and_linear_between() -> None:
    lo, hi = motion.MOTION_LOW, motion.MOTION_HIGH
    assert motion.motion_scale(0.0) == motion.motion_scale(lo) == 1.0
    assert motion.motion_scale(hi) == motion.motion_scale(10 * hi) == 0.0
    assert motion.motion_scale((lo + hi) / 2) == pytest.approx(0.5)


def _measures(video) -> list[float]:
    meter = motion.MotionMeter()
    return [meter.measure(f) for f in video][1:]


def test_sensor_noise_keeps_the_memory_and_a_moving_shape_turns_it_off() -> None:
    assert max(_measures(moving_clip(0.0, 8)[0])) < motion.MOTION_LOW  # σ 10 noise on a still scene
    assert min(_measures(moving_clip(3.0, 8)[0])) > motion.MOTION_HIGH  # 3 px per frame
    assert motion.MotionMeter().measure(moving_clip(6.0, 1)[0][0]) == 0.0  # the first frame has no motion


@pytest.fixture(scope="module")
def torch_gen(tiny_components):
    return Generator(tiny_components, create_backend("torch", tiny_components))


def _run(g, cfg, frames):
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))
    s = core.add(cfg)
    out = []
    for i, f in enumerate(frames):
        core.submit(s.id, Frame(image=f, seq=i))
        out += core.step()
    out += core.flush()
    return [o.image for o in out]


def _cfg(**kw) -> StreamConfig:
    return StreamConfig(**{"prompt": "a red circle", "mode": "img2img", "steps": 1, "strength": 0.7, "seed": 3,
                           "width": SIZE, "height": SIZE, **kw})


def test_feedback_and_memory_are_scaled_by_the_measured_motion(torch_gen) -> None:
    rs = np.random.RandomState(0)
    base = (rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    moving = [np.roll(base, 5 * k, axis=1) for k in range(5)]
    still = [base] * 3 + [np.roll(base, 5, axis=1)] * 2  # one step, then still again
    for arm in ({"feedback": 0.6}, {"temporal": 1.0, "temporal_decay": 0.9}):
        adaptive = _run(torch_gen, _cfg(motion_adaptive=True, **arm), moving)
        plain = _run(torch_gen, _cfg(), moving)
        fixed = _run(torch_gen, _cfg(**arm), moving)
        for a, b in zip(plain, adaptive, strict=True):  # fast motion: the frame runs without memory
            np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
        assert max(np.abs(a - b).max() for a, b in zip(fixed, plain, strict=True)) > 1e-3
        # still frames keep the full weight (frames 0-2 are exactly the fixed arm's), the step loses it
        on_still = _run(torch_gen, _cfg(motion_adaptive=True, **arm), still)
        fixed_still = _run(torch_gen, _cfg(**arm), still)
        for k in (0, 1, 2):
            np.testing.assert_array_equal(on_still[k], fixed_still[k])
        assert np.abs(on_still[3] - fixed_still[3]).max() > 1e-3


def test_the_ghost_measure_counts_output_shape_pixels_far_outside_the_input_shape() -> None:
    from ditstream.engine.demo import dataset as ds
    from ditstream.engine.demo.temporal_quality import SHAPE, ghost

    assert ghost(ds.render(SHAPE), SHAPE) == 0.0
    trailing = ds.ShapeSpec(SHAPE.shape, SHAPE.colour, SHAPE.background, SHAPE.cx - 8, SHAPE.cy, SHAPE.radius)
    share = ghost(ds.render(trailing), SHAPE)  # an output 8 px behind its input
    assert 0.05 < share < 0.5
