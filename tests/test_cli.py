"""The ``ditstream`` command as a user runs it: generate equals diffusers, bench engine reports ratios."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import run_cli

SIZE = 32



@pytest.fixture(scope="module")
def pipes(tiny_components):
    from diffusers import SanaSprintImg2ImgPipeline, SanaSprintPipeline

    c = tiny_components
    parts = dict(transformer=c.transformer, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                 scheduler=c.scheduler)
    return SanaSprintPipeline(**parts), SanaSprintImg2ImgPipeline(**parts)


def _ref_kwargs(seed: int) -> dict:
    return dict(height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed), output_type="np",
                use_resolution_binning=False, complex_human_instruction=None, guidance_scale=4.5)


@pytest.mark.parametrize("steps", [1, 2])
def test_generate_txt2img_cli_equals_diffusers(tmp_path, tiny_model_dir, pipes, steps):
    out = tmp_path / "t.npy"
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", str(steps),
             "--seed", "7", "--size", f"{SIZE}x{SIZE}", "--guidance-scale", "4.5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    ref = pipes[0](prompt="a red circle", num_inference_steps=steps, max_timesteps=math.pi / 2,
                   intermediate_timesteps=1.3 if steps == 2 else None, **_ref_kwargs(7)).images[0]
    assert np.abs(np.load(out) - ref).max() <= 1e-4


@pytest.mark.parametrize("strength", [0.5, 0.9])
def test_generate_img2img_cli_equals_diffusers(tmp_path, tiny_model_dir, pipes, strength):
    rs = np.random.RandomState(3)
    src = Image.fromarray((rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8))
    src.save(tmp_path / "in.png")
    out = tmp_path / "i.npy"
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "a blue star", "--image", str(tmp_path / "in.png"),
             "--strength", str(strength), "--steps", "1", "--seed", "4", "--size", f"{SIZE}x{SIZE}",
             "--guidance-scale", "4.5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    ref = pipes[1](prompt="a blue star", image=src, num_inference_steps=1, max_timesteps=strength * math.pi / 2,
                   intermediate_timesteps=None, strength=1.0, **_ref_kwargs(4)).images[0]
    assert np.abs(np.load(out) - ref).max() <= 1e-4


def test_generate_png_and_clear_errors(tmp_path, tiny_model_dir):
    out = tmp_path / "x.png"
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "--size", f"{SIZE}x{SIZE}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (SIZE, SIZE)
    r = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    r = run_cli("generate", "--model", str(partial), "--prompt", "x")
    assert r.returncode == 2 and "missing" in r.stderr and "transformer/" in r.stderr
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "x", "--size", "33x32")
    assert r.returncode == 2 and "width" in r.stderr
    from testkit import png_bomb

    (tmp_path / "bomb.png").write_bytes(png_bomb(30000, 30000))  # refused from its header, not a traceback
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "x", "--image", str(tmp_path / "bomb.png"))
    assert r.returncode == 2 and "too many pixels" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_engine_json_reports_both_ratios():
    r = run_cli("bench", "engine", "--json", "--frames", "4", "--streams", "3", "--steps", "2", "--repeats", "1",
             timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("stream_batch_speedup", "cross_batch_speedup",  # timings: their targets are in docs/benchmarks.md
                "temporal_cost_batch1", "temporal_cost_batch3"):
        assert 0 < data[key] < math.inf, data
    # the similarity filter is seeded and the clips are fixed: a static clip (similarity 1, skip probability
    # 1) has one frame of every 11 processed (max_skip 10), so 181 of its 200 frames are skipped
    assert data["ssf_skip_rate_static"] == 181 / 200
    assert 0 <= data["ssf_skip_rate_moving"] < data["ssf_skip_rate_static"]
    assert data["temporal_refused"] is None  # the torch backend carries attention memory
