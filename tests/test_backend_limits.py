"""Backend limits and warm-up: the core never calls a backend beyond its profile, streams outside it
are refused when they open, and the runner is not ready until every shape is warm."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ditstream.engine.backends import create_backend
from ditstream.engine.backends.base import Backend, BackendLimits
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.errors import GenerationError, ValidationError
from ditstream.engine.prompt_cache import PromptCache
from ditstream.engine.runner import EngineRunner
from ditstream.engine.types import Frame

SIZE = 32


class LimitedBackend(Backend):
    """The tiny torch backend behind a profile: records every call and fails, like TensorRT would,
    on a batch or size outside it. ``gate`` (an Event) holds ``warmup`` until the test sets it."""

    name = "limited"
    needs_warmup = True

    def __init__(self, inner: Backend, limits: BackendLimits, gate: threading.Event | None = None) -> None:
        super().__init__(inner.components)
        self.inner = inner
        self._limits = limits
        self.gate = gate
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.warmed: list[tuple[int, int, int]] = []
        self.warmup_threads: set[str] = set()
        self.warmup_started = threading.Event()

    @property
    def limits(self) -> BackendLimits:
        return self._limits

    def warmup(self, shapes):
        self.warmup_started.set()
        self.warmup_threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never released warm-up"
        self.warmed.extend(shapes)

    def _check(self, kind: str, shape: tuple[int, ...], pixel_hw: tuple[int, int]) -> None:
        self.calls.append((kind, shape))
        lim = self._limits
        if lim.max_batch is not None and shape[0] > lim.max_batch:
            raise GenerationError(f"{kind} batch {shape[0]} is beyond the profile's {lim.max_batch}")
        h, w = pixel_hw
        for v, span in ((w, lim.width), (h, lim.height)):
            if span is not None and not span[0] <= v <= span[1]:
                raise GenerationError(f"{kind} size {w}x{h} is outside the profile")

    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        f = self.components.vae_scale_factor
        self._check("denoise", tuple(x.shape), (x.shape[2] * f, x.shape[3] * f))
        return self.inner.denoise(x, timestep, encoder_hidden_states, encoder_attention_mask, guidance)

    def encode(self, images):
        self._check("encode", tuple(images.shape), (images.shape[2], images.shape[3]))
        return self.inner.encode(images)

    def decode(self, latents):
        f = self.components.vae_scale_factor
        self._check("decode", tuple(latents.shape), (latents.shape[2] * f, latents.shape[3] * f))
        return self.inner.decode(latents)


PROFILE = BackendLimits(max_batch=8, width=(SIZE, 2 * SIZE), height=(SIZE, 2 * SIZE), sizes=((SIZE, SIZE),))


@pytest.fixture(scope="module")
def torch_backend(tiny_components):
    return create_backend("torch", tiny_components)


@pytest.fixture(scope="module")
def prompts(tiny_components):
    return PromptCache(tiny_components)


def _configs(n: int) -> list[StreamConfig]:
    return [StreamConfig(prompt=f"stream {i % 3}", mode="img2img" if i % 2 else "txt2img", steps=1 + i % 2,
                         strength=0.5 + 0.04 * i, seed=i, width=SIZE, height=SIZE) for i in range(n)]


def _run(core: EngineCore, configs: list[StreamConfig], n_frames: int = 3) -> list[list[np.ndarray]]:
    rs = np.random.RandomState(0)
    states = [core.add(c) for c in configs]
    got: dict[str, list] = {s.id: [] for s in states}
    for i in range(n_frames):
        frame = (rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
        for s in states:
            core.submit(s.id, Frame(image=frame if s.config.mode == "img2img" else None, seq=i))
        for o in core.step():
            got[o.stream_id].append(o.image)
    for o in core.flush():
        got[o.stream_id].append(o.image)
    return [got[s.id] for s in states]


def test_limits_describe_and_check():
    assert BackendLimits().describe() == "any size, any batch"
    trt = BackendLimits(max_batch=8, width=(256, 1024), height=(256, 1024))
    assert trt.describe() == "256-1024 px, batch 1-8"
    trt.check_size(512, 768)
    with pytest.raises(ValidationError, match=r"size 1280x720 is outside this engine's profile: 256-1024 px, "
                                              r"batch 1-8"):
        trt.check_size(1280, 720)
    BackendLimits().check_size(4096, 4096)  # unbounded


def test_tensorrt_limits_come_from_its_build_profile():
    from ditstream.engine.backends.tensorrt_backend import (
        DEFAULT_BATCH_SIZES,
        DEFAULT_RESOLUTIONS,
        TensorRTBackend,
    )
    from ditstream.trt_build.cache import BuildProfile

    backend = TensorRTBackend.__new__(TensorRTBackend)  # no GPU here: only the profile is needed
    backend.profile = BuildProfile.from_request(DEFAULT_RESOLUTIONS, DEFAULT_BATCH_SIZES)
    backend._sizes = DEFAULT_RESOLUTIONS
    assert backend.limits.describe() == "256-1024 px, batch 1-8"
    assert backend.limits.sizes == DEFAULT_RESOLUTIONS
    assert TensorRTBackend.needs_warmup


def test_core_never_calls_beyond_the_backend_limit_and_matches_unlimited(tiny_components, torch_backend, prompts):
    configs = _configs(12)
    cfg = EngineConfig(max_batch=16, output_float=True)
    unlimited = EngineCore(tiny_components, torch_backend, prompts, cfg)
    want = _run(unlimited, configs)
    assert max(unlimited.batch_sizes) > 8  # the unlimited run really made calls the profile refuses

    limited = LimitedBackend(torch_backend, PROFILE)
    core = EngineCore(tiny_components, limited, prompts, cfg)
    assert core.max_batch == 8
    got = _run(core, configs)
    assert limited.calls and max(shape[0] for _, shape in limited.calls) <= 8
    assert {kind for kind, _ in limited.calls} == {"denoise", "encode", "decode"}
    for a_list, b_list in zip(want, got, strict=True):
        assert len(a_list) == len(b_list) == 3
        for a, b in zip(a_list, b_list, strict=True):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_engine_max_batch_below_the_backend_limit_wins(tiny_components, torch_backend, prompts):
    core = EngineCore(tiny_components, LimitedBackend(torch_backend, PROFILE), prompts, EngineConfig(max_batch=3))
    assert core.max_batch == 3


def test_runner_refuses_sizes_outside_the_profile_when_they_open(tiny_components, torch_backend, prompts):
    backend = LimitedBackend(torch_backend, PROFILE)
    runner = EngineRunner(EngineCore(tiny_components, backend, prompts, EngineConfig(max_batch=16))).start()
    try:
        assert runner.wait_ready(30)
        big = StreamConfig(prompt="x", mode="txt2img", width=4 * SIZE, height=SIZE)
        msg = r"size 128x32 is outside this engine's profile: 32-64 px, batch 1-8"
        with pytest.raises(ValidationError, match=msg):
            runner.add_stream(big)
        with pytest.raises(ValidationError, match=msg):
            runner.submit_job(big)
        h = runner.add_stream(big.replace(width=SIZE))
        with pytest.raises(ValidationError, match=msg):
            h.reconfigure(width=4 * SIZE)
        h.close()
        out = runner.submit_job(big.replace(width=2 * SIZE)).result(60)  # the profile's edge is fine
        assert out.image.shape == (SIZE, 2 * SIZE, 3)
        assert not [c for c in backend.calls if c[1][0] > 8]
    finally:
        runner.stop()


def test_runner_is_not_ready_until_warm_up_is_done(tiny_components, torch_backend, prompts):
    gate = threading.Event()
    backend = LimitedBackend(torch_backend, PROFILE, gate=gate)
    runner = EngineRunner(EngineCore(tiny_components, backend, prompts, EngineConfig(max_batch=16)))
    assert runner.warmup_shapes() == [(b, SIZE, SIZE) for b in range(1, 9)]  # the profile, up to its batch 8
    runner.start()
    try:
        assert backend.warmup_started.wait(30)
        assert runner.alive and not runner.ready and not backend.warm
        assert runner.warming and runner.warming[-1] == f"batch 8 at {SIZE}x{SIZE}"
        assert runner.stats()["ready"] is False
        gate.set()
        assert runner.wait_ready(30)
        assert runner.ready and backend.warm and runner.warming == []
        assert backend.warmed == [(b, SIZE, SIZE) for b in range(1, 9)]
        assert backend.warmup_threads == {runner.name}  # on the engine thread, where graphs replay
        assert not backend.calls  # warm-up is the backend's own business, not a tick
    finally:
        gate.set()
        runner.stop()


def test_runner_with_a_warm_backend_is_ready_at_once(tiny_components, torch_backend, prompts):
    runner = EngineRunner(EngineCore(tiny_components, torch_backend, prompts)).start()
    try:
        assert torch_backend.warm and runner.warmup_shapes() == []
        assert runner.ready  # no warm-up: ready as soon as it runs, with nothing to wait for
    finally:
        runner.stop()


def test_a_failing_warm_up_kills_the_engine_loudly(tiny_components, torch_backend, prompts):
    class Broken(LimitedBackend):
        def warmup(self, shapes):
            raise RuntimeError("CUDA graph capture failed")

    runner = EngineRunner(EngineCore(tiny_components, Broken(torch_backend, PROFILE), prompts)).start()
    assert runner.wait_ready(30) is False
    assert not runner.ready and isinstance(runner.error, RuntimeError)
    runner.stop()


def test_compile_warms_one_batch_per_bucket(tiny_components):
    pytest.importorskip("torch._dynamo")
    from ditstream.engine.backends.compile_backend import CompileBackend

    backend = CompileBackend(tiny_components, pad_to_buckets=True)  # builds nothing yet: no compiler needed
    assert backend.needs_warmup and not backend.warm
    assert backend.limits.max_batch == 32
    assert backend.warmup_batches(16) == [1, 2, 4, 8, 16]
    assert backend.warmup_batches(12) == [1, 2, 4, 8, 12]
    assert CompileBackend(tiny_components).warmup_batches(16) == [1]  # dynamic shapes on CPU
