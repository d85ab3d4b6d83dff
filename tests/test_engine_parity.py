"""Parity: our engine equals diffusers' SanaSprint pipelines; stream batch equals sequential sampling.

The model is the real diffusers/transformers classes at diffusers' tiny test size, saved in diffusers
layout and loaded back through ``engine.loader`` (``tiny_model_dir`` fixture).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.types import Frame
from PIL import Image

TOL = 1e-4
SIZE = 32


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    base = (rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    # a moving bright square over a fixed background, so consecutive frames differ
    out = []
    for i in range(n):
        f = base.copy()
        f[4 + i : 12 + i, 6 + 2 * i : 14 + 2 * i] = 255
        out.append(f)
    return out


def _reference_pipelines(components):
    from diffusers import SanaSprintImg2ImgPipeline, SanaSprintPipeline

    parts = dict(transformer=components.transformer, vae=components.vae, text_encoder=components.text_encoder,
                 tokenizer=components.tokenizer, scheduler=components.scheduler)
    t2i, i2i = SanaSprintPipeline(**parts), SanaSprintImg2ImgPipeline(**parts)
    t2i.set_progress_bar_config(disable=True)
    i2i.set_progress_bar_config(disable=True)
    return t2i, i2i


@pytest.mark.parametrize("steps", [1, 2])
def test_txt2img_equals_diffusers(tiny_generator, steps):
    t2i, _ = _reference_pipelines(tiny_generator.components)
    cfg = StreamConfig(prompt="a red circle on a blue background", mode="txt2img", steps=steps, seed=11,
                       width=SIZE, height=SIZE)
    ours = tiny_generator.generate_unit(cfg).numpy()
    ref = t2i(prompt=cfg.prompt, num_inference_steps=steps, max_timesteps=math.pi / 2,
              intermediate_timesteps=1.3 if steps == 2 else None, guidance_scale=cfg.guidance_scale,
              height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(11), output_type="np",
              use_resolution_binning=False, complex_human_instruction=None).images[0]
    assert ours.shape == ref.shape == (SIZE, SIZE, 3)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= TOL
    assert ours.std() > 0.01  # a real image, not a constant


@pytest.mark.parametrize("strength", [0.4, 0.9])
def test_img2img_one_step_equals_diffusers(tiny_generator, strength):
    _, i2i = _reference_pipelines(tiny_generator.components)
    image = _frames(1)[0]
    cfg = StreamConfig(prompt="a green star", mode="img2img", steps=1, strength=strength, seed=5,
                       width=SIZE, height=SIZE)
    ours = tiny_generator.generate_unit(cfg, image).numpy()
    ref = i2i(prompt=cfg.prompt, image=Image.fromarray(image), num_inference_steps=1,
              max_timesteps=strength * math.pi / 2, intermediate_timesteps=None, strength=1.0,
              guidance_scale=cfg.guidance_scale, height=SIZE, width=SIZE,
              generator=torch.Generator().manual_seed(5), output_type="np", use_resolution_binning=False,
              complex_human_instruction=None).images[0]
    assert np.abs(ours - ref).max() <= TOL


def test_strength_changes_the_output(tiny_generator):
    image = _frames(1)[0]
    a = tiny_generator.generate_unit(StreamConfig(prompt="x", strength=0.3, width=SIZE, height=SIZE), image)
    b = tiny_generator.generate_unit(StreamConfig(prompt="x", strength=0.9, width=SIZE, height=SIZE), image)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_stream_batch_equals_sequential(tiny_generator, steps):
    g = tiny_generator
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))
    cfg = StreamConfig(prompt="a blue ring", mode="img2img", steps=steps, strength=0.8, seed=2,
                       width=SIZE, height=SIZE)
    state = core.add(cfg)
    calls: list[int] = []  # the size of each denoise call, in order
    core.on_batch = lambda size, _s: calls.append(size)
    frames = _frames(6)
    outputs = []
    for i, f in enumerate(frames):
        core.submit(state.id, Frame(image=f, seq=i))
        outputs += core.step()
    # lag is steps-1 ticks: nothing came out before the first frame had all its steps
    assert len(outputs) == len(frames) - (steps - 1)
    outputs += core.flush()
    assert [o.seq for o in outputs] == list(range(len(frames)))
    assert calls[:steps] == list(range(1, steps + 1))  # the buffer fills, then runs full
    assert max(calls) == steps and sorted(core.batch_sizes.elements()) == sorted(calls)
    for o, f in zip(outputs, frames, strict=True):
        ref = g.generate_unit(cfg, f).numpy()
        assert not o.skipped
        assert np.abs(o.image - ref).max() <= TOL


def test_stream_batch_emits_no_warmup_garbage(tiny_generator):
    """The first output is the first frame's full n-step result, not a partly denoised buffer."""
    g = tiny_generator
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))
    cfg = StreamConfig(prompt="a star", steps=3, strength=0.9, seed=4, width=SIZE, height=SIZE)
    sid = core.add(cfg).id
    f = _frames(1)[0]
    core.submit(sid, Frame(image=f, seq=0))
    first = core.flush()
    assert [o.seq for o in first] == [0]
    assert np.abs(first[0].image - g.generate_unit(cfg, f).numpy()).max() <= TOL


def test_shorter_text_length_changes_cost_not_results(tiny_components):
    """Padding is masked out of cross-attention: 32 tokens give the image 300 tokens give."""
    from ditstream.engine.generate import Generator
    from ditstream.engine.prompt_cache import PromptCache

    cfg = StreamConfig(prompt="a red circle on a blue background", mode="txt2img", steps=2, seed=3,
                       width=SIZE, height=SIZE)
    long = Generator(tiny_components, prompts=PromptCache(tiny_components, max_sequence_length=300))
    short = Generator(tiny_components, prompts=PromptCache(tiny_components, max_sequence_length=32))
    assert short.prompts.get(cfg.prompt)[0].shape[1] == 32
    np.testing.assert_allclose(short.generate_unit(cfg).numpy(), long.generate_unit(cfg).numpy(), atol=1e-5)
