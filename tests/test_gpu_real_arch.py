"""The real architecture, randomly initialised: SANA-Sprint 0.6B transformer + DC-AE f32c32 (the configs
of their diffusers folders, ``bench.gpu.SANA_SPRINT_06B`` / ``DC_AE_F32C32``; nothing downloaded) at
512², one img2img frame in bf16 through ``EngineCore``: finite, the right shape, not constant; its
time and peak device memory recorded (printed into the pytest log and kept as test properties).

Random weights do not make a picture, but they run every layer at the real widths and depths: shape
or dtype faults (DC-AE in bf16, a 16×16 latent grid, 300 caption tokens of 2304 channels) show here
and not on the tiny config. Skipped with the reason without CUDA; with ``DITSTREAM_GPU_TESTS_DEVICE=cpu``
it runs on the CPU only when ``DITSTREAM_GPU_TESTS_REAL_ARCH=1`` too (0.9 B parameters in bf16 on a
CPU: minutes).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from ditstream.engine.backends import create_backend
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.types import Frame
from gpukit import DEVICE, NEEDS_GPU

pytestmark = [
    pytest.mark.gpu,
    NEEDS_GPU,
    pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("DITSTREAM_GPU_TESTS_REAL_ARCH") != "1",
                       reason="the 0.6B model on the CPU stand-in takes minutes: set DITSTREAM_GPU_TESTS_REAL_ARCH=1"),
]
#: 512² as the issue asks; ``DITSTREAM_GPU_TESTS_REAL_ARCH_SIZE`` (a multiple of 32) lets the CPU stand-in
#: check the test's own code at a size a CPU finishes (512² in bf16 took over 20 minutes on 2 shared cores).
SIZE = int(os.environ.get("DITSTREAM_GPU_TESTS_REAL_ARCH_SIZE", "512"))
SEQ_LEN, CAPTION = 300, 2304


class RandomPrompts:
    """Prompt embeddings of the real text encoder's shape (Gemma-2 2B: 2304 channels, 300 tokens), seeded."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(0)
        self._value = (torch.randn(1, SEQ_LEN, CAPTION, generator=g).to(device, dtype),
                       torch.ones(1, SEQ_LEN, dtype=torch.long, device=device))

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._value


def test_sana_sprint_06b_one_img2img_frame_in_bf16_at_512(record_property, capsys):
    from ditstream.bench.gpu import build_components

    device = torch.device(DEVICE)
    c = build_components("sana-sprint-0.6b", device, torch.bfloat16)
    assert sum(p.numel() for p in c.transformer.parameters()) > 550e6  # the real width and depth
    assert c.vae.dtype == torch.bfloat16 and c.vae_scale_factor == 32 and c.latent_channels == 32
    core = EngineCore(c, create_backend("torch", c), RandomPrompts(device, c.dtype), EngineConfig(output_float=True))
    sid = core.add(StreamConfig(prompt="x", mode="img2img", steps=1, strength=0.6, seed=1, width=SIZE,
                                height=SIZE)).id
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    core.submit(sid, Frame(image=image, seq=0))
    out = core.step() + core.flush()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    assert [o.seq for o in out] == [0] and out[0].error is None, out
    img = out[0].image
    assert img.shape == (SIZE, SIZE, 3) and np.isfinite(img).all() and img.std() > 0
    record_property("frame_s", round(seconds, 3))
    record_property("peak_bytes", peak)
    with capsys.disabled():
        print(f"\nreal-arch SANA-Sprint 0.6B + DC-AE, {SIZE}², img2img 1 step, bf16 on {device} "
              f"({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}): first frame "
              f"{seconds:.3f} s (includes cuDNN/cuBLAS warm-up), peak {peak / 2**30 if peak else float('nan'):.2f} GiB")
