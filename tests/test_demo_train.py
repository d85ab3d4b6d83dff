"""The demo model's training code (``ditstream train-demo``): its math agrees with the engine's, its
ODE inversion round-trips, and a tiny end-to-end run writes a model the loader serves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from engine.demo import dataset as ds
from engine.demo import train as T


@pytest.fixture(scope="module")
def components():
    from engine.config import ModelConfig
    from engine.loader import load_components

    torch.set_num_threads(2)
    return load_components(ModelConfig(model="demo", device="cpu", dtype="fp32"))


def _captions_embedding(components, captions):
    return T.encode_text(components.text_encoder, components.tokenizer, captions, torch.device("cpu"))


def test_training_model_call_equals_the_engine_model_call(components) -> None:
    """What the student is trained through is exactly what the engine serves with."""
    from engine import plan
    from engine.backends import create_backend
    from engine.prompt_cache import PromptCache

    caption = ds.caption_for("star", "red", "white")
    emb, mask = _captions_embedding(components, [caption])
    cache_emb, cache_mask = PromptCache(components).get(caption)
    n = int(mask.sum())
    # The training path encodes 8 tokens, the engine many more with padding masked: same embeddings.
    assert torch.allclose(emb[0, :n], cache_emb[0, :n], atol=1e-5)
    assert int(cache_mask.sum()) == n

    g = torch.Generator().manual_seed(0)
    c, h, w = plan.latent_shape(components, 64, 64)
    x = torch.randn((3, c, h, w), generator=g)
    t = torch.tensor([math.pi / 2, 0.9, 0.3])
    guidance = float(components.defaults.get("guidance_scale", 3.0))
    with torch.no_grad():
        ours = T.trigflow_x0(components.transformer, x, t, emb.expand(3, -1, -1), mask.expand(3, -1), guidance)
        gvec = torch.full((1,), guidance * components.guidance_embeds_scale)
        engine = plan.predict_x0(create_backend("torch", components), components, x, t,
                                 cache_emb.expand(3, -1, -1), cache_mask.expand(3, -1), gvec.expand(3))
    assert torch.allclose(ours, engine, atol=1e-4), (ours - engine).abs().max()


def test_second_order_inversion_round_trips_better_than_ddim(components) -> None:
    """Real images carried to noise and back along the same ODE come back (the inversion pairs)."""
    dev = torch.device("cpu")
    images, specs = ds.make_dataset(8, seed=3)
    scale = float(components.scaling_factor)
    x0 = T.encode_latents(components.vae, images, scale, dev)
    emb, mask = _captions_embedding(components, [s.caption for s in specs])
    tr, g = components.transformer, 3.0
    up = list(np.linspace(0.0, math.pi / 2, 9))

    def ddim(x, a, b):
        f = T.trigflow_flow(tr, x, torch.full((x.shape[0],), a), emb, mask, g)
        return math.cos(b - a) * x + math.sin(b - a) * f

    def heun(x, a, b):
        return T.heun_step(tr, x, a, b, emb, mask, g)

    errors = {}
    with torch.no_grad():
        for name, step in (("ddim", ddim), ("heun", heun)):
            x = x0
            for a, b in itertools.pairwise(up):
                x = step(x, a, b)
            noise = x
            for a, b in itertools.pairwise(up[::-1]):
                x = step(x, a, b)
            errors[name] = float((x - x0).square().mean() / x0.var())
            assert not torch.allclose(noise, x0)
    assert errors["heun"] < 0.5 * errors["ddim"], errors
    assert errors["heun"] < 0.1, errors


def test_inversion_pairs_start_from_unit_noise_and_end_on_the_real_latents(components) -> None:
    dev = torch.device("cpu")
    images, specs = ds.make_dataset(6, seed=4)
    scale = float(components.scaling_factor)
    latents = T.encode_latents(components.vae, images, scale, dev)
    cfg = T.TrainConfig(pairs=4, teacher_sample_steps=3)
    states, angles, ends, caps = T.invert_pairs(components.transformer, components.text_encoder,
                                                components.tokenizer, latents, [s.caption for s in specs],
                                                cfg, dev, np.random.default_rng(0))
    assert states.shape == (4, 3, *latents.shape[1:])
    assert torch.allclose(angles, torch.tensor([math.pi / 2, math.pi / 3, math.pi / 6]), atol=1e-6)
    by_caption = {s.caption: latents[i] for i, s in enumerate(specs)}
    for end, cap in zip(ends, caps, strict=True):
        assert torch.equal(end, by_caption[cap])
    start_std = states[:, 0].flatten(1).std(1)
    assert torch.allclose(start_std, torch.full_like(start_std, T.SIGMA_D), atol=1e-4)


def test_a_tiny_training_run_writes_a_model_the_engine_serves(tmp_path) -> None:
    """The whole recipe at a few steps (~30 s): a diffusers folder the loader reads and generates with."""
    from engine.config import ModelConfig, StreamConfig
    from engine.generate import Generator
    from engine.loader import load_components

    cfg = T.TrainConfig(n_images=64, ae_steps=2, ae_batch=4, teacher_steps=3, teacher_batch=4, pairs=8,
                        teacher_sample_steps=2, student_steps=2, student_batch=4, vae_channels=(8, 16, 32),
                        latent_channels=8, patch_size=2, transformer=dict(hidden=32, layers=1, heads=2))
    out = T.train_demo(tmp_path / "model", cfg, workdir=tmp_path / "wd")
    assert (tmp_path / "wd" / "teacher.pt").is_file()
    comps = load_components(ModelConfig(model=str(out), device="cpu", dtype="fp32"))
    assert comps.vae_scale_factor == 4 and comps.transformer.config.patch_size == 2
    assert comps.max_sequence_length == T.SERVE_TOKENS  # the retrained demo once lost it (300 tokens served)
    image = Generator(comps).generate(StreamConfig(prompt=ds.caption_for("ring", "blue", "white"), mode="txt2img",
                                                   width=64, height=64, steps=1, seed=0))
    assert np.asarray(image).shape == (64, 64, 3)


def test_shape_following_tells_a_shape_word_the_model_uses_from_one_it_ignores(components) -> None:
    """The teacher probe's diagnosis: with its own caption the noised shape comes back; with a caption
    naming another shape the shipped model still draws the input's shape (it does not follow shape
    words), so the two shares must differ widely."""
    f = T.shape_following(components.transformer, components.text_encoder, components.tokenizer,
                          components.vae, float(components.scaling_factor), T.TrainConfig(),
                          torch.device("cpu"), n=60)
    assert 0.0 <= f["other"] <= 1.0 and 0.0 <= f["own"] <= 1.0
    assert f["own"] > f["other"] + 0.2, f
