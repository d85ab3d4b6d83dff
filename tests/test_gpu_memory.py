"""1,000 frames through one stream leave ``torch.cuda.memory_allocated`` flat.

A live stream runs for hours: anything the engine keeps per frame on the device (a latent kept for
feedback, a per-tick tensor built from a list, a captured output) would grow memory until the GPU is
full. The tiny pipeline at 32², img2img with feedback (the path that keeps a latent per stream),
uint8 output as served; about 5-10 s on a GPU. Skipped with the reason without CUDA;
``DITSTREAM_GPU_TESTS_DEVICE=cpu`` runs the loop on the CPU, where nothing is measured (checks the test's code).
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
]

SIZE = 32
FRAMES, WARMUP, EVERY = 1000, 50, 100
#: The caching allocator hands out blocks of at least 512 bytes: one leaked block per frame would
#: grow 500 KB over the run; 64 KiB is the spread allowed between samples taken at the same point
#: of the tick.
MAX_SPREAD = 64 * 1024


def test_a_thousand_frames_leave_device_memory_flat(tiny_model_dir):
    from ditstream.engine.generate import Generator
    from ditstream.engine.loader import load_components

    g = Generator(load_components(ModelConfig(model=str(tiny_model_dir), device=DEVICE, dtype="fp32")))
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig())
    cfg = StreamConfig(prompt="a red circle", mode="img2img", steps=1, strength=0.6, seed=1, feedback=0.3,
                       width=SIZE, height=SIZE)
    sid = core.add(cfg).id
    rs = np.random.RandomState(0)
    inputs = [(rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8) for _ in range(8)]
    allocated = (lambda: torch.cuda.memory_allocated(g.components.device)) if DEVICE == "cuda" else (lambda: 0)
    samples, emitted = [], 0
    for i in range(FRAMES):
        core.submit(sid, Frame(image=inputs[i % len(inputs)], seq=i))
        out = core.step()
        assert all(o.error is None and not o.skipped for o in out)
        emitted += len(out)
        if i >= WARMUP and (i - WARMUP) % EVERY == 0:
            samples.append(allocated())
    emitted += len(core.flush())
    assert emitted == FRAMES  # every frame really ran (none dropped or skipped as similar)
    assert len(samples) == (FRAMES - WARMUP - 1) // EVERY + 1
    spread = max(samples) - min(samples)
    assert spread <= MAX_SPREAD, f"device memory grew by {spread} bytes over {FRAMES} frames: {samples}"
