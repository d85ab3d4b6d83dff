"""Batching and failure isolation on CUDA: stream batching (one stream's frames at different steps in
one call) and cross-stream batching (several streams in one call) give each frame what it gets alone,
and a NaN in one sample fails only its frame, with one finiteness check per decode call.

The tiny real-class pipeline in fp32 with TF32 off. On a GPU, kernels are chosen per batch size and
may sum in another order, so "equal" is 1e-4 on [0, 1] images here (1e-5 on CPU). Skipped with the
reason without CUDA; ``DITSTREAM_GPU_TESTS_DEVICE=cpu`` runs them on the CPU instead (checks the tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditstream.engine.config import EngineConfig, ModelConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.errors import GenerationError
from ditstream.engine.types import Frame
from gpukit import DEVICE, NEEDS_GPU
from testkit import run_streams

pytestmark = [
    pytest.mark.gpu,
    NEEDS_GPU,
    pytest.mark.usefixtures("no_tf32"),
]

SIZE = 32
ATOL = 1e-4
CONFIGS = [
    StreamConfig(prompt="a red circle", mode="img2img", steps=1, strength=0.5, seed=1, width=SIZE, height=SIZE),
    StreamConfig(prompt="a blue square on a white background", mode="img2img", steps=2, strength=0.8, seed=2,
                 width=SIZE, height=SIZE, guidance_scale=2.0),
    StreamConfig(prompt="a cat", mode="txt2img", steps=3, seed=3, width=SIZE, height=SIZE),
    StreamConfig(prompt="a dog on a horse", mode="img2img", steps=2, strength=0.6, seed=4, width=SIZE, height=SIZE),
]


@pytest.fixture(scope="module")
def gpu_components(tiny_model_dir):
    from ditstream.engine.loader import load_components

    return load_components(ModelConfig(model=str(tiny_model_dir), device=DEVICE, dtype="fp32"))


@pytest.fixture(scope="module")
def gpu_generator(gpu_components):
    from ditstream.engine.generate import Generator

    return Generator(gpu_components)


def _frames(n: int, seed: int = 1) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    return [(rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8) for _ in range(n)]


def _run(core: EngineCore, configs: list[StreamConfig], frames: list[np.ndarray]) -> list[list]:
    """Frame ``i`` to every stream on tick ``i``; per stream, its outputs in emission order."""
    return run_streams(core, configs, frames)


def _core(g) -> EngineCore:
    return EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))


def test_stream_batching_on_cuda_equals_each_frame_alone(gpu_generator):
    cfg = CONFIGS[2].replace(mode="img2img", strength=0.9)  # three steps: three frames share each call
    frames = _frames(5)
    core = _core(gpu_generator)
    (outputs,) = _run(core, [cfg], frames)
    assert max(core.batch_sizes) == 3 and [o.seq for o in outputs] == list(range(5))
    for o, f in zip(outputs, frames, strict=True):
        np.testing.assert_allclose(o.image, gpu_generator.generate_unit(cfg, f).cpu().numpy(), atol=ATOL, rtol=0)


def test_cross_stream_batching_on_cuda_equals_each_stream_alone(gpu_generator):
    frames = _frames(4)
    core = _core(gpu_generator)
    together = _run(core, CONFIGS, frames)
    assert max(core.batch_sizes) == sum(c.steps for c in CONFIGS)  # all eight slots shared one call
    for k, cfg in enumerate(CONFIGS):
        (alone,) = _run(_core(gpu_generator), [cfg], frames)
        assert [o.seq for o in together[k]] == [o.seq for o in alone] == list(range(len(frames)))
        for a, b in zip(alone, together[k], strict=True):
            np.testing.assert_allclose(b.image, a.image, atol=ATOL, rtol=0)
    assert np.abs(together[0][0].image - together[1][0].image).max() > 1e-2  # the streams do differ


def test_a_nan_in_one_sample_fails_only_its_frame_checked_once_per_decode(gpu_components, monkeypatch):
    """A NaN in one sample of a shared two-step denoise rides into the next shared call and is caught
    at decode: its frame fails, every other frame equals the run without the fault, and finiteness is
    checked once per decode call (one device wait), never per denoise call."""
    from faults import faulty_core

    cfgs = [CONFIGS[1], CONFIGS[3]]
    frames = _frames(4)
    ref = _run(faulty_core(gpu_components, EngineConfig(output_float=True))[0], cfgs, frames)
    core, backend = faulty_core(gpu_components, EngineConfig(output_float=True))
    checks = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: checks.append(t.device) or real_isfinite(t))
    states = [core.add(c) for c in cfgs]
    got: dict[str, list] = {s.id: [] for s in states}
    for i, f in enumerate(frames):
        if i == 2:
            backend.inject("denoise", nan_samples=(0,))
        for s in states:
            core.submit(s.id, Frame(image=f, seq=i))
        for o in core.step():
            got[o.stream_id].append(o)
    for o in core.flush():
        got[o.stream_id].append(o)
    failed = [(k, o.seq) for k, s in enumerate(states) for o in got[s.id] if o.error is not None]
    assert len(failed) == 1 and core.failed_calls["nonfinite"] == 1, failed
    bad_k, bad_seq = failed[0]
    bad = got[states[bad_k].id][bad_seq]
    assert isinstance(bad.error, GenerationError) and bad.image is None and "non-finite" in bad.error.message
    for k, s in enumerate(states):
        assert [o.seq for o in got[s.id]] == list(range(len(frames)))
        for o, r in zip(got[s.id], ref[k], strict=True):
            if (k, o.seq) != failed[0]:
                np.testing.assert_allclose(o.image, r.image, atol=ATOL, rtol=0)
    assert len(checks) == backend.calls["decode"] > 0 and {d.type for d in checks} == {torch.device(DEVICE).type}
