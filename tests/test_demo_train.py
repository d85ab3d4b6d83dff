"""The demo model's training code (``ditstream train-demo``): its math agrees with the engine's, its
ODE inversion round-trips, and a tiny end-to-end run writes a model the loader serves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from ditstream.engine.demo import components as TM
from ditstream.engine.demo import config as TC
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo import latents as TL
from ditstream.engine.demo import probes as TP
from ditstream.engine.demo import recipe as R
from ditstream.engine.demo import train as T
from ditstream.engine.demo import trigflow as TF


@pytest.fixture(scope="module")
def components():
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components

    torch.set_num_threads(2)
    return load_components(ModelConfig(model="demo", device="cpu", dtype="fp32"))


def _captions_embedding(components, captions):
    return TM.encode_text(components.text_encoder, components.tokenizer, captions, torch.device("cpu"))


def test_training_model_call_equals_the_engine_model_call(components) -> None:
    """What the student is trained through is exactly what the engine serves with."""
    from ditstream.engine import plan
    from ditstream.engine.backends import create_backend
    from ditstream.engine.prompt_cache import PromptCache

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
        ours = TF.trigflow_x0(components.transformer, x, t, emb.expand(3, -1, -1), mask.expand(3, -1), guidance)
        gvec = torch.full((1,), guidance * components.guidance_embeds_scale)
        engine = plan.predict_x0(create_backend("torch", components), components, x, t,
                                 cache_emb.expand(3, -1, -1), cache_mask.expand(3, -1), gvec.expand(3))
    assert torch.allclose(ours, engine, atol=1e-4), (ours - engine).abs().max()


def test_second_order_inversion_round_trips_better_than_ddim(components) -> None:
    """Real images carried to noise and back along the same ODE come back (the inversion pairs)."""
    dev = torch.device("cpu")
    _, specs = ds.make_dataset(8, seed=3)
    scale = float(components.scaling_factor)
    x0 = TL.clean_latents(specs, TC.TrainConfig(), scale, dev)  # what the pairs are made from
    emb, mask = _captions_embedding(components, [s.caption for s in specs])
    tr, g = components.transformer, 3.0
    up = list(np.linspace(0.0, math.pi / 2, 9))

    def ddim(x, a, b):
        f = TF.trigflow_flow(tr, x, torch.full((x.shape[0],), a), emb, mask, g)
        return math.cos(b - a) * x + math.sin(b - a) * f

    def heun(x, a, b):
        return TF.heun_step(tr, x, a, b, emb, mask, g)

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
    latents = TL.encode_latents(components.vae, images, scale, dev)
    cfg = TC.TrainConfig(pairs=4, teacher_sample_steps=3)
    states, angles, ends, caps = TF.invert_pairs(components.transformer, components.text_encoder,
                                                components.tokenizer, latents, [s.caption for s in specs],
                                                cfg, dev, np.random.default_rng(0))
    assert states.shape == (4, 3, *latents.shape[1:])
    assert torch.allclose(angles, torch.tensor([math.pi / 2, math.pi / 3, math.pi / 6]), atol=1e-6)
    by_caption = {s.caption: latents[i] for i, s in enumerate(specs)}
    for end, cap in zip(ends, caps, strict=True):
        assert torch.equal(end, by_caption[cap])
    start_std = states[:, 0].flatten(1).std(1)
    assert torch.allclose(start_std, torch.full_like(start_std, TC.SIGMA_D), atol=1e-4)


def test_the_designed_latent_holds_class_colours_and_coverage() -> None:
    """The autoencoder's target latent: each channel group means what the docstring says."""
    spec = ds.ShapeSpec("triangle", "red", "blue", 30.0, 25.0, 14.0)
    other = ds.ShapeSpec("ring", "red", "blue", 30.0, 25.0, 14.0)
    z = TL.designed_latent([spec], 8)[0].numpy()
    assert z.shape == (TC.LATENT_CHANNELS, 8, 8)
    mask = ds.shape_mask("triangle", 30.0, 25.0, 14.0)
    cover = mask.reshape(8, 8, 8, 8).mean((1, 3))
    k = ds.SHAPES.index("triangle")
    np.testing.assert_allclose(z[k], TL.CLASS_GAIN * cover, atol=1e-6)
    assert np.abs(np.delete(z[:5], k, axis=0)).max() == 0.0
    np.testing.assert_allclose(z[11], cover, atol=1e-6)
    np.testing.assert_allclose(z[12:].mean(0), cover, atol=1e-6)  # the quarters average to the cell
    inside = cover > 0.99
    red = np.asarray(ds.COLOURS["red"]) / 127.5 - 1
    blue = np.asarray(ds.COLOURS["blue"]) / 127.5 - 1
    np.testing.assert_allclose(z[5:8][:, inside].mean(1), red, atol=1e-5)
    np.testing.assert_allclose(z[8:11][:, cover == 0].mean(1), blue, atol=1e-5)
    # Class from the spec, coverage from the geometry donor (how the decoder learns to read the class).
    swapped = TL.designed_latent([spec], 8, [other])[0].numpy()
    ring_cover = ds.shape_mask("ring", 30.0, 25.0, 14.0).reshape(8, 8, 8, 8).mean((1, 3))
    np.testing.assert_allclose(swapped[k], TL.CLASS_GAIN * ring_cover, atol=1e-6)
    assert not np.allclose(swapped[11], z[11])


def test_latent_blur_is_continuous_in_passes_and_keeps_constants() -> None:
    """The decoder's training blur: 0 passes is the identity, 1 pass the 3×3 binomial filter, fractions
    interpolate, a constant latent stays constant (edges replicated), amounts are per sample."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn((3, TC.LATENT_CHANNELS, 8, 8), generator=g)
    assert torch.equal(TL.blur_latents(z, torch.zeros(3)), z)
    one = TL.blur_latents(z, torch.ones(3))
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    inner = (z[:, :, 3:6, 3:6] * k).sum((2, 3))  # the filter centred on cell (4, 4)
    torch.testing.assert_close(one[:, :, 4, 4], inner)
    half = TL.blur_latents(z, torch.full((3,), 0.5))
    torch.testing.assert_close(half, 0.5 * (z + one))
    mixed = TL.blur_latents(z, torch.tensor([0.0, 1.0, 2.5]))
    torch.testing.assert_close(mixed[0], z[0])
    torch.testing.assert_close(mixed[1], one[1])
    assert one.std() < z.std()
    flat = torch.full((2, TC.LATENT_CHANNELS, 8, 8), 0.7)
    torch.testing.assert_close(TL.blur_latents(flat, torch.tensor([2.0, 3.0])), flat)


def test_the_decoder_stage_changes_only_the_decoder_and_no_shared_random_stream() -> None:
    """``train_decoder_for_one_step`` runs between the autoencoder and the teacher: it must leave the
    encoder (img2img inputs, the student's edit inputs) and torch's global generator alone, so the
    later stages are the same with or without it (the shipped run resumed the teacher on that basis)."""
    cfg = TC.TrainConfig(vae_channels=(8, 16, 32, 64), decoder_steps=3, ae_batch=2)
    vae = TM.build_components(cfg)["vae"]
    images, specs = ds.make_dataset(8, seed=0)
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    T.train_decoder_for_one_step(vae, images, specs, cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert all(torch.equal(v, encoder[k]) for k, v in vae.encoder.state_dict().items())
    assert any(not torch.equal(v, decoder[k]) for k, v in vae.decoder.state_dict().items())


def test_the_autoencoder_refuses_a_latent_width_the_design_does_not_have() -> None:
    cfg = TC.TrainConfig(latent_channels=8, ae_steps=1)
    with pytest.raises(ValueError, match="16 channels"):
        T.train_autoencoder(None, np.zeros((1, 64, 64, 3), np.uint8), [], cfg, torch.device("cpu"),
                            np.random.default_rng(0))


def test_a_tiny_training_run_writes_a_model_the_engine_serves(tmp_path) -> None:
    """The whole recipe at a few steps (~30 s): a diffusers folder the loader reads and generates with."""
    from ditstream.engine.config import ModelConfig, StreamConfig
    from ditstream.engine.generate import Generator
    from ditstream.engine.loader import load_components

    cfg = TC.TrainConfig(n_images=64, ae_steps=2, ae_batch=4, decoder_steps=2, teacher_steps=3, teacher_batch=4, pairs=8, second_step_share=1.0,
                        teacher_sample_steps=2, student_steps=2, student_batch=4, vae_channels=(8, 16, 32),
                        patch_size=2, transformer=dict(hidden=32, layers=1, heads=2))
    out = R.train_demo(tmp_path / "model", cfg, workdir=tmp_path / "wd", lora_steps=2)
    assert (tmp_path / "wd" / "teacher.pt").is_file() and (tmp_path / "wd" / "decoder.pt").is_file()
    assert (out / "loras" / "swap.safetensors").is_file()  # the demo LoRA stage ran on the new model
    comps = load_components(ModelConfig(model=str(out), device="cpu", dtype="fp32"))
    assert comps.vae_scale_factor == 4 and comps.transformer.config.patch_size == 2
    assert comps.max_sequence_length == TC.SERVE_TOKENS  # the retrained demo once lost it (300 tokens served)
    image = Generator(comps).generate(StreamConfig(prompt=ds.caption_for("ring", "blue", "white"), mode="txt2img",
                                                   width=64, height=64, steps=1, seed=0))
    assert np.asarray(image).shape == (64, 64, 3)
    # A rerun with the same workdir resumes both checkpointed stages and says so in ditstream.json.
    import json

    again = R.train_demo(tmp_path / "again", cfg, workdir=tmp_path / "wd", lora_steps=0)
    timings = json.loads((again / "ditstream.json").read_text())["training"]["timings"]
    assert timings["resumed"] == ["autoencoder", "decoder", "teacher"]
    first = json.loads((out / "ditstream.json").read_text())["training"]["timings"]
    assert first["resumed"] == []


def test_the_shipped_model_draws_the_shape_its_caption_names(components) -> None:
    """The teacher probe's diagnosis on the shipped model: noised real latents predicted back with their
    own caption and with a caption naming another shape. A model that ignores shape words returns the
    input's shape (the previous, learnt-latent weights: 18 % for another shape's word, chance 20 %);
    the shipped one draws the named shape (93 % measured at n = 60)."""
    f = TP.shape_following(components.transformer, components.text_encoder, components.tokenizer,
                          components.vae, float(components.scaling_factor), TC.TrainConfig(),
                          torch.device("cpu"), n=60)
    assert f["own"] >= 0.8, f
    assert f["other"] >= 0.7, f
