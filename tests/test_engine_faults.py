"""Failure isolation: a failed or non-finite model call fails only its own frames and jobs.

The backend is the real torch backend of the tiny model, wrapped by ``faults.FaultyBackend``;
outputs of the frames that did not fail are compared with a run without faults, so "the others
are unaffected" is checked bit for bit, and "emitted in order" per stream.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.errors import EngineDeadError, GenerationError, is_fatal_device_error
from ditstream.engine.runner import EngineRunner
from ditstream.engine.types import Frame
from faults import ILLEGAL_ACCESS, faulty_core, width_is

SMALL, BIG = 32, 64


def _cfg(seed: int, size: int = SMALL, steps: int = 1, mode: str = "img2img") -> StreamConfig:
    return StreamConfig(prompt=f"prompt {seed}", mode=mode, steps=steps, strength=0.7, seed=seed,
                        width=size, height=size)


def _frames(n: int, size: int = SMALL, seed: int = 0) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    return [(rs.rand(size, size, 3) * 255).astype(np.uint8) for _ in range(n)]


def _drive(components, cfgs, frames, faults=None):
    """Feed frame ``i`` to every stream on tick ``i``; ``faults[i](backend, scale)`` before tick ``i``.

    Returns per stream the outputs in emission order, and the core.
    """
    core, backend = faulty_core(components, EngineConfig(output_float=True))
    states = [core.add(c) for c in cfgs]
    got = {s.id: [] for s in states}
    for i in range(len(frames[0])):
        if faults and i in faults:
            faults[i](backend, components.vae_scale_factor)
        for s, fr in zip(states, frames, strict=True):
            core.submit(s.id, Frame(image=fr[i] if s.config.mode == "img2img" else None, seq=i))
        for o in core.step():
            got[o.stream_id].append(o)
    for o in core.flush():
        got[o.stream_id].append(o)
    return [got[s.id] for s in states], core


def _same(a, b):
    assert a.error is None and b.error is None
    np.testing.assert_allclose(a.image, b.image, atol=1e-5, rtol=0)  # batch composition may differ


def test_nan_fails_only_the_non_finite_samples_of_a_shared_call(tiny_components):
    cfgs = [_cfg(1), _cfg(2), _cfg(3)]
    frames = [_frames(4, seed=k) for k in range(3)]
    ref, _ = _drive(tiny_components, cfgs, frames)
    got, core = _drive(tiny_components, cfgs, frames,
                       {2: lambda b, _s: b.inject("denoise", nan_samples=(1,))})
    assert max(core.batch_sizes) == 3  # the three streams really shared the faulty call
    for k in range(3):
        assert [o.seq for o in got[k]] == [0, 1, 2, 3]
    bad = got[1][2]
    assert isinstance(bad.error, GenerationError) and bad.image is None and "non-finite" in bad.error.message
    for k in range(3):
        for i in range(4):
            if (k, i) != (1, 2):
                _same(got[k][i], ref[k][i])
    assert core.failed_frames == 1 and core.failed_calls["nonfinite"] == 1
    assert core.streams[next(iter(core.streams))].stats.failed == 0
    assert list(core.streams.values())[1].stats.failed == 1


def test_a_nan_latent_carried_through_stream_batch_fails_only_its_frame_checked_once_per_decode(
        tiny_components, monkeypatch):
    """Two steps: the NaN of one sample rides through renoise into the next stage's shared call and is
    caught at decode. Finiteness is checked on decoded images only (one device wait per decode call,
    none per denoise call); the other samples of both shared calls are untouched."""
    cfgs = [_cfg(1, steps=2), _cfg(2, steps=2)]
    frames = [_frames(5, seed=k) for k in range(2)]
    ref, _ = _drive(tiny_components, cfgs, frames)
    checks = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: checks.append(t.shape) or real_isfinite(t))
    got, core = _drive(tiny_components, cfgs, frames, {2: lambda b, _s: b.inject("denoise", nan_samples=(0,))})
    decodes = core.backend.calls["decode"]
    assert decodes > 0 and len(checks) == decodes, (len(checks), decodes)
    errors = [o.error for k in range(2) for o in got[k] if o.error is not None]
    failed = [(k, o.seq) for k in range(2) for o in got[k] if o.error is not None]
    assert len(failed) == 1 and core.failed_calls["nonfinite"] == 1, failed
    assert "non-finite" in errors[0].message
    for k in range(2):
        assert [o.seq for o in got[k]] == list(range(5))
        for o, r in zip(got[k], ref[k], strict=True):
            if (k, o.seq) not in failed:
                _same(o, r)


@pytest.mark.parametrize("stage", ["encode", "denoise", "decode"])
def test_a_raising_call_fails_only_its_frames_and_the_other_stream_goes_on(tiny_components, stage):
    """Stream A (32 px) and B (64 px) never share a call; A's call raises on tick 2, B never notices."""
    cfgs = [_cfg(1, SMALL), _cfg(2, BIG)]
    frames = [_frames(5, SMALL, 1), _frames(5, BIG, 2)]
    ref, _ = _drive(tiny_components, cfgs, frames)

    def fault(b, scale):
        b.inject(stage, error=RuntimeError("backend exploded"), when=width_is(SMALL, 1 if stage == "encode" else scale))

    got, core = _drive(tiny_components, cfgs, frames, {2: fault})
    assert [o.seq for o in got[0]] == [0, 1, 2, 3, 4]
    assert [o.seq for o in got[1]] == [0, 1, 2, 3, 4]
    err = got[0][2].error
    assert isinstance(err, GenerationError) and stage in err.message and "backend exploded" in err.message
    for i in (0, 1, 3, 4):
        _same(got[0][i], ref[0][i])
    for i in range(5):
        _same(got[1][i], ref[1][i])
    assert core.failed_calls[stage] == 1 and core.failed_frames == 1


def test_failed_frames_leave_no_stale_state_in_a_multi_step_pipeline(tiny_components):
    """Three steps: the denoise call on tick 4 holds frames 2, 3, 4; they fail, later frames are exact."""
    cfgs = [_cfg(5, steps=3)]
    frames = [_frames(9, seed=5)]
    ref, _ = _drive(tiny_components, cfgs, frames)
    got, core = _drive(tiny_components, cfgs, frames,
                       {4: lambda b, _s: b.inject("denoise", error=ValueError("bad shape"))})
    assert [o.seq for o in got[0]] == list(range(9))
    failed = [o.seq for o in got[0] if o.error is not None]
    assert failed == [2, 3, 4]
    for i in range(9):
        if i not in failed:
            _same(got[0][i], ref[0][i])
    state = next(iter(core.streams.values()))
    assert not state.pipeline and state.stats.failed == 3 and state.stats.processed == 6


def test_an_unrecoverable_device_error_leaves_step(tiny_components):
    core, backend = faulty_core(tiny_components)
    s = core.add(_cfg(1))
    backend.inject("denoise", error=RuntimeError(ILLEGAL_ACCESS))
    core.submit(s.id, Frame(image=_frames(1)[0]))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        core.step()


def test_fatal_device_errors_are_classified_in_one_place():
    assert is_fatal_device_error(RuntimeError(ILLEGAL_ACCESS))
    assert is_fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    if hasattr(torch, "AcceleratorError"):
        assert is_fatal_device_error(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert not is_fatal_device_error(RuntimeError("CUDA error: out of memory"))
    assert not is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_fatal_device_error(RuntimeError("shapes cannot be multiplied"))
    assert not is_fatal_device_error(ValueError("CUDA error"))
    assert not is_fatal_device_error(GenerationError("NaN"))


# ---------------------------------------------------------------------------------------------- runner
def _runner(components) -> tuple[EngineRunner, object]:
    core, backend = faulty_core(components)
    return EngineRunner(core).start(), backend


def test_runner_fails_only_the_faulty_jobs_and_frames_and_lives_on(tiny_components):
    runner, backend = _runner(tiny_components)
    scale = tiny_components.vae_scale_factor
    try:
        stream = runner.add_stream(_cfg(1, SMALL))
        frames = _frames(6, SMALL, 1)
        job_cfg = _cfg(9, BIG, mode="txt2img")
        outcomes = []
        for i in range(6):
            if i == 2:  # the job's decode raises: only the job fails
                backend.inject("decode", error=RuntimeError("decoder exploded"), when=width_is(BIG, scale))
            if i == 3:  # the job's denoise output is NaN
                backend.inject("denoise", nan_samples=(0,), when=width_is(BIG, scale))
            if i == 4:  # the stream's own call raises: its frame fails in-band, the next one is fine
                backend.inject("denoise", error=RuntimeError("transformer exploded"), when=width_is(SMALL, scale))
            job = runner.submit_job(job_cfg)
            stream.submit(frames[i], seq=i)
            out = stream.outputs.get(timeout=60)
            assert out is not None and out.seq == i
            outcomes.append(out)
            if i in (2, 3):
                with pytest.raises(GenerationError):
                    job.result(timeout=60)
            else:
                assert job.result(timeout=60).image.shape == (BIG, BIG, 3)
        assert [o.error is not None for o in outcomes] == [False, False, False, False, True, False]
        assert isinstance(outcomes[4].error, GenerationError) and outcomes[4].image is None
        assert runner.alive
        st = runner.stats()
        assert st["failed_frames"] == 3 and st["failed_calls"]["decode"] == 1
        assert st["failed_calls"]["nonfinite"] == 1 and st["failed_calls"]["denoise"] == 1
        assert stream.stats.failed == 1 and stream.stats.processed == 5
        assert st["jobs"] == 0
    finally:
        runner.stop()


def test_runner_survives_an_error_outside_the_model_calls(tiny_components):
    runner, _ = _runner(tiny_components)
    try:
        stream = runner.add_stream(_cfg(1))
        real_denoise = runner.core._denoise_all
        calls = {"n": 0}

        def broken_denoise():  # a bug in the core's own code, not in a model call
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("bug in the tick")
            return real_denoise()

        runner.core._denoise_all = broken_denoise
        frames = _frames(2)
        stream.submit(frames[0], seq=0)
        first = stream.outputs.get(timeout=60)
        assert first is not None and first.seq == 0 and isinstance(first.error, GenerationError)
        stream.submit(frames[1], seq=1)
        second = stream.outputs.get(timeout=60)
        assert second is not None and second.seq == 1 and second.error is None
        assert runner.alive and runner.core.failed_calls["tick"] == 1
    finally:
        runner.stop()


def test_runner_dies_loudly_on_an_unrecoverable_device_error(tiny_components, caplog):
    runner, backend = _runner(tiny_components)
    try:
        stream = runner.add_stream(_cfg(1))
        backend.inject("denoise", error=RuntimeError(ILLEGAL_ACCESS))
        job = runner.submit_job(_cfg(2, mode="txt2img"))
        with pytest.raises(EngineDeadError):
            job.result(timeout=60)
        assert stream.outputs.get(timeout=60) is None and stream.outputs.closed
        assert not runner.alive and "illegal memory access" in repr(runner.error)
        assert "unrecoverable device error" in caplog.text
        with pytest.raises(EngineDeadError):
            runner.submit_job(_cfg(3, mode="txt2img"))
    finally:
        runner.stop()
