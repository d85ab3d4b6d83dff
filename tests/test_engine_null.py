"""The null engine is the real ``EngineCore`` on the null model and backend: exact echoes, real batching.

No threads and no sleeps: the core is stepped directly. Every test here runs in milliseconds.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from ditstream.engine.backends import create_backend
from ditstream.engine.backends.null_backend import NullBackend
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.errors import BackendUnavailableError, ValidationError
from ditstream.engine.null import NullPrompts, null_components, null_runner
from ditstream.engine.types import Frame
from ditstream.server.metrics import Metrics

SIZE = 16


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def test_the_null_engine_is_the_real_core_on_the_null_backend():
    core = null_runner().core
    assert type(core) is EngineCore and isinstance(core.backend, NullBackend)
    assert core.size_multiple == 8 and core.max_batch == EngineConfig().max_batch
    with pytest.raises(ValidationError):  # the core's own validation: 60 is not a multiple of 8
        core.add(StreamConfig(prompt="p", width=60, height=64))


@pytest.mark.parametrize(("steps", "strength"), [(1, 0.6), (3, 0.6), (2, 0.05), (1, 0.95)])
def test_img2img_outputs_are_the_inputs_exactly(steps, strength):
    """Random pixels (no flat shade hides an error) come back bit-exact, in order, through the sampler."""
    core = null_runner().core
    state = core.add(StreamConfig(prompt="p", mode="img2img", steps=steps, strength=strength, width=SIZE,
                                  height=SIZE, seed=3))
    images = [_image(i) for i in range(5)]
    outputs = []
    for i, image in enumerate(images):
        core.submit(state.id, Frame(image=image, seq=i))
        outputs += core.step()
    outputs += core.flush()
    assert [o.seq for o in outputs] == list(range(5))
    for out, image in zip(outputs, images, strict=True):
        assert out.error is None and not out.skipped
        np.testing.assert_array_equal(out.image, image)


def test_txt2img_outputs_are_flat_grey_at_any_seed_and_steps():
    core = null_runner().core
    for seed, steps in ((0, 1), (7, 2), (9, 4)):
        state = core.add(StreamConfig(prompt="p", mode="txt2img", steps=steps, width=SIZE, height=24, seed=seed))
        core.submit(state.id, Frame(image=None))
        (out,) = core.flush()
        assert out.image.shape == (24, SIZE, 3) and (out.image == 128).all()


def test_a_glide_between_null_plans_stays_an_exact_echo():
    """Glides blend noise only between different noise tensors; the null model's zeros are one tensor."""
    core = null_runner().core
    state = core.add(StreamConfig(prompt="a", mode="img2img", width=SIZE, height=SIZE, seed=1))
    core.reconfigure(state.id, state.config.replace(prompt="b", seed=2, strength=0.3, transition_frames=3))
    for i in range(4):
        core.submit(state.id, Frame(image=_image(i), seq=i))
        (out,) = core.step()
        np.testing.assert_array_equal(out.image, _image(i))


def test_the_null_backend_is_registered_and_refuses_a_model_that_draws_noise():
    components = null_components()
    assert isinstance(create_backend("null", components), NullBackend)
    components.draws_noise = True  # a real model's plans: x / cos t would return noise, not an image
    with pytest.raises(BackendUnavailableError, match="null model"):
        create_backend("null", components)


def test_batch_sizes_are_a_bounded_exact_histogram():
    """10 streams, max_batch 4, three ticks: each tick calls 4 + 4 + 2; the histogram counts exactly that,
    on the core (one key per size ≤ max_batch) and on the Prometheus histogram the server exports."""
    runner = null_runner(EngineConfig(max_batch=4))
    metrics = Metrics()
    runner.bind_metrics(metrics)
    core = runner.core
    states = [core.add(StreamConfig(prompt="p", mode="img2img", width=SIZE, height=SIZE)) for _ in range(10)]
    for tick in range(3):
        for state in states:
            core.submit(state.id, Frame(image=_image(tick), seq=tick))
        assert len(core.step()) == 10
    assert core.batch_sizes == Counter({4: 6, 2: 3})
    for _ in range(50):  # more ticks add counts, never keys: bounded by max_batch
        for state in states:
            core.submit(state.id, Frame(image=_image(0)))
        core.step()
    assert core.batch_sizes == Counter({4: 106, 2: 53})

    def bucket(le: str) -> float:
        return metrics.registry.get_sample_value("ditstream_batch_size_bucket", {"le": le})

    assert (bucket("1.0"), bucket("2.0"), bucket("3.0"), bucket("4.0")) == (0, 53, 53, 159)
    assert metrics.registry.get_sample_value("ditstream_batch_size_sum") == 4 * 106 + 2 * 53


def test_each_denoise_call_costs_the_delay_on_the_cores_clock():
    """``delay_s`` is slept per model call, and the frame's inference time is its calls' time."""
    slept: list[float] = []
    now = [0.0]

    def fake_sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    components = null_components()
    backend = NullBackend(components, delay_s=0.25, sleep=fake_sleep)
    core = EngineCore(components, backend, NullPrompts(), EngineConfig(max_batch=2), clock=lambda: now[0])
    states = [core.add(StreamConfig(prompt="p", mode="img2img", width=SIZE, height=SIZE)) for _ in range(3)]
    for state in states:
        core.submit(state.id, Frame(image=_image(1), received_at=now[0]))
    outs = core.step()
    assert slept == [0.25, 0.25]  # two calls: 2 + 1 samples
    assert [o.timings["inference"] for o in outs] == [0.25, 0.25, 0.25]
