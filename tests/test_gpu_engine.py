"""The engine on CUDA equals the engine on CPU: the tiny real-class pipeline, txt2img and img2img, one
and two steps, fp32 with a tight tolerance and bf16 against fp32 with a stated one.

Noise is drawn on the host (``sampler``: a CPU generator per seed), so both devices start from the
same latents and any difference is arithmetic. fp32 runs with TF32 off (cuDNN enables it for
convolutions by default; the DC-AE is convolutions), so "tight" means float rounding, not TF32.
Each test takes a second or two on a GPU; they skip with the reason on a machine without CUDA.
``DITSTREAM_GPU_TESTS_DEVICE=cpu`` runs them with the CPU standing in for the GPU, which checks the
tests' own code (and shows them fail on a broken build) where no GPU is at hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditstream.engine.config import EngineConfig, ModelConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.types import Frame
from gpukit import DEVICE, NEEDS_GPU

pytestmark = [
    pytest.mark.gpu,
    NEEDS_GPU,
    pytest.mark.usefixtures("no_tf32"),
]

SIZE = 32
FRAMES = 3
#: fp32 CUDA vs fp32 CPU, images in [0, 1]: float rounding through a few dozen layers.
FP32_ATOL = 1e-4
#: bf16 CUDA vs fp32 CPU, images in [0, 1]: bf16 keeps 8 bits of mantissa (~0.4 % per rounding), and
#: a few pixels near a clipping edge move most. Measured bf16 vs fp32 on CPU over these four cases:
#: mean <= 0.004, 99th percentile <= 0.039, max <= 0.19; the bounds are about twice that. Another seed
#: (a wrong image) differs by a mean of ~0.15 and a 99th percentile of ~0.5.
BF16_MEAN, BF16_P99, BF16_MAX = 0.01, 0.08, 0.35


def _load(model_dir, device: str, dtype: str):
    from ditstream.engine.generate import Generator
    from ditstream.engine.loader import load_components

    return Generator(load_components(ModelConfig(model=str(model_dir), device=device, dtype=dtype)))


@pytest.fixture(scope="module")
def cpu_fp32(tiny_model_dir):
    return _load(tiny_model_dir, "cpu", "fp32")


@pytest.fixture(scope="module")
def cuda_fp32(tiny_model_dir):
    return _load(tiny_model_dir, DEVICE, "fp32")


@pytest.fixture(scope="module")
def cuda_bf16(tiny_model_dir):
    return _load(tiny_model_dir, DEVICE, "bf16")


def _frames(n: int = FRAMES, seed: int = 0) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    return [(rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8) for _ in range(n)]


def run_engine(g, cfg: StreamConfig, frames: list[np.ndarray]) -> np.ndarray:
    """One stream through ``EngineCore`` (float output): the images, in order, stacked."""
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))
    sid = core.add(cfg).id
    out = []
    for i, f in enumerate(frames):
        core.submit(sid, Frame(image=f if cfg.mode == "img2img" else None, seq=i))
        out += core.step()
    out += core.flush()
    assert [o.seq for o in out] == list(range(len(frames))) and all(o.error is None for o in out)
    return np.stack([o.image for o in out])


CASES = [pytest.param(mode, steps, id=f"{mode}-{steps}step") for mode in ("txt2img", "img2img") for steps in (1, 2)]


def _cfg(mode: str, steps: int) -> StreamConfig:
    return StreamConfig(prompt="a red circle on a blue background", mode=mode, steps=steps, strength=0.7, seed=3,
                        width=SIZE, height=SIZE)


@pytest.mark.parametrize("mode,steps", CASES)
def test_fp32_on_cuda_equals_cpu(cpu_fp32, cuda_fp32, mode, steps):
    cfg, frames = _cfg(mode, steps), _frames()
    want, got = run_engine(cpu_fp32, cfg, frames), run_engine(cuda_fp32, cfg, frames)
    assert got.shape == want.shape == (FRAMES, SIZE, SIZE, 3)
    assert want.std() > 0.01  # a real picture, so the comparison is not vacuous
    np.testing.assert_allclose(got, want, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("mode,steps", CASES)
def test_bf16_on_cuda_is_fp32_within_the_stated_tolerance(cpu_fp32, cuda_bf16, mode, steps):
    assert cuda_bf16.components.vae.dtype == torch.bfloat16 and cuda_bf16.components.dtype == torch.bfloat16
    cfg, frames = _cfg(mode, steps), _frames()
    want, got = run_engine(cpu_fp32, cfg, frames), run_engine(cuda_bf16, cfg, frames)
    assert np.isfinite(got).all()
    err = np.abs(got - want)
    stats = {"mean": err.mean(), "p99": np.quantile(err, 0.99), "max": err.max()}
    assert stats["mean"] <= BF16_MEAN and stats["p99"] <= BF16_P99 and stats["max"] <= BF16_MAX, stats
    assert err.max() > 0  # really bf16: some rounding shows
