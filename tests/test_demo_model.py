"""The built-in demo model: procedural data, the model-independent evaluator, and a fast subset of
the quality figures of ``ditstream bench quality`` (the full run is in docs/demo_model_card.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import read_image, score

# --------------------------------------------------------------------------- data and evaluator

def test_dataset_is_deterministic_by_seed() -> None:
    a, sa = ds.make_dataset(12, seed=3)
    b, sb = ds.make_dataset(12, seed=3)
    c, _ = ds.make_dataset(12, seed=4)
    assert a.shape == (12, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_captions_cover_every_combination_with_a_known_vocabulary() -> None:
    caps = ds.all_captions()
    assert len(caps) == len(ds.SHAPES) * len(ds.COLOURS) * (len(ds.COLOURS) - 1) == 280
    assert all(colour != bg for _, colour, bg in caps)
    vocab = set(ds.vocabulary())
    assert all(set(ds.caption_for(*c).split()) <= vocab for c in caps)
    assert ds.caption_for("triangle", "green", "white") == "a green triangle on a white background"


def test_images_show_what_the_caption_says() -> None:
    spec = ds.ShapeSpec("square", "red", "blue", 20.0, 40.0, 10.0)
    img = ds.render(spec)
    assert tuple(img[40, 20]) == ds.COLOURS["red"]
    assert tuple(img[2, 2]) == ds.COLOURS["blue"]
    cx, cy = ds.true_centroid(spec)
    assert abs(cx - 20.0) < 0.3 and abs(cy - 40.0) < 0.3


def test_evaluator_is_accurate_on_ground_truth() -> None:
    images, specs = ds.make_dataset(150, seed=11)
    s = score(images, [(x.shape, x.colour, x.background) for x in specs])
    assert s.colour == 1.0 and s.background == 1.0
    assert s.shape >= 0.99
    errs = [np.hypot(*(np.subtract(read_image(i).centroid, ds.true_centroid(x)))) for i, x in zip(images, specs)]
    assert max(errs) < 0.5


def test_evaluator_tolerates_noise_and_flags_blur() -> None:
    images, specs = ds.make_dataset(60, seed=12)
    rng = np.random.default_rng(0)
    noisy = np.clip(images.astype(np.float32) + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8)
    s = score(noisy, [(x.shape, x.colour, x.background) for x in specs])
    assert s.colour >= 0.95 and s.shape >= 0.9
    # The "blurry mean of positions": the average of many images of one caption is not a sharp shape.
    mean = np.mean([ds.render(ds.ShapeSpec("star", "red", "white", *ds.random_geometry(rng))) for _ in range(32)],
                   axis=0).astype(np.uint8)
    sharp = read_image(ds.render(ds.ShapeSpec("star", "red", "white", 32, 32, 14)))
    blurry = read_image(mean)
    assert sharp.shape == "star" and sharp.sharpness > 0.9
    assert blurry.sharpness < sharp.sharpness - 0.2


# --------------------------------------------------------------------------- the shipped model

@pytest.fixture(scope="module")
def components():
    import torch
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components

    torch.set_num_threads(2)
    return load_components(ModelConfig(model="demo", device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def generator(components):
    from ditstream.engine.generate import Generator

    return Generator(components)


def test_demo_model_loads_through_the_loader_as_sana_sprint(components) -> None:
    from diffusers import AutoencoderDC, SanaTransformer2DModel, SCMScheduler
    from ditstream.engine.loader import DEMO_MODEL_DIR
    from transformers import Gemma2Model

    assert isinstance(components.transformer, SanaTransformer2DModel)
    assert isinstance(components.vae, AutoencoderDC)
    assert isinstance(components.text_encoder, Gemma2Model)
    assert isinstance(components.scheduler, SCMScheduler)
    assert components.complex_human_instruction is None
    assert components.defaults["width"] == 64 and components.defaults["steps"] == 1
    assert components.max_sequence_length == 32
    weights = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*.safetensors"))
    assert weights < 16 * 2**20, f"demo weights are {weights / 2**20:.1f} MB"


@pytest.fixture(scope="module")
def one_step_subset(generator, components) -> dict[str, float]:
    """One-step txt2img scores over 100 captions (stride 13 is coprime with 280, so they spread over
    every shape, colour and background); shared by the acceptance and the 2-vs-1-step tests."""
    from ditstream.engine.demo.quality import _defaults, txt2img_scores

    return txt2img_scores(generator, _defaults(components), 100, 1, seed=100, stride=13)


def test_one_step_txt2img_meets_the_acceptance_thresholds(one_step_subset) -> None:
    """Issue 3's one-step txt2img bar (≥ 80 % colour, ≥ 70 % shape, sharp) on the fast subset.

    Chance is 12.5 % for colour and 20 % for shape. The full 280-caption figures are in the model
    card (``ditstream bench quality``). History: the learnt-latent weights drew blobs (28 % shape);
    the designed latent with a decoder trained on exact latents only, 56 %; that decoder fine-tuned
    to draw through blurred latents lifted one step over the bar.
    """
    s = one_step_subset
    assert s["background"] >= 0.9, s
    assert s["colour"] >= 0.8, s
    assert s["shape"] >= 0.7, s
    assert s["sharpness"] >= 0.85, s


def test_two_steps_are_at_least_as_good_as_one(generator, components, one_step_subset) -> None:
    """Issue 3: 2 steps (the model's own intermediate angle) vs 1 step, same seeds, on the fast subset.

    txt2img over 100 captions: neither colour nor shape agreement may drop (measured: colour 99 =
    99 %, shape 79 → 90 %; at the earlier angle 0.7 these weights lost colour, 99.3 → 96.4 % over
    280, as the earlier weights did at SANA-Sprint's 1.3). img2img through a 2-slot stream batch: the
    prompt colour must not drop and the centroid may move by at most a quarter pixel (full run:
    0.58 px against 0.53 px for one step; a real regression is pixels).
    """
    from ditstream.engine.demo.quality import (
        CLIPS,
        _defaults,
        img2img_one_step,
        img2img_stream,
        txt2img_scores,
    )

    d = _defaults(components)
    assert components.intermediate_angle == pytest.approx(1.1)
    one = one_step_subset
    two = txt2img_scores(generator, d, 100, 2, seed=100, stride=13)
    assert two["colour"] >= one["colour"] and two["shape"] >= one["shape"], (one, two)
    strength = float(d["strength"])
    i1 = img2img_one_step(generator, d, 4, strength, seed=0, clips=CLIPS[:2])
    i2 = img2img_stream(components, d, 4, strength, 2, seed=0, clips=CLIPS[:2])
    assert i2["colour"] >= i1["colour"], (i1, i2)
    assert i2["centroid_err_mean"] <= i1["centroid_err_mean"] + 0.25, (i1, i2)


def test_one_step_img2img_keeps_position_and_takes_the_prompt_colour(generator, components) -> None:
    from ditstream.engine.demo.quality import CLIPS, _defaults, img2img_one_step

    d = _defaults(components)
    s = img2img_one_step(generator, d, 4, float(d["strength"]), seed=0, clips=CLIPS[:2])
    assert s["centroid_err_mean"] <= 4.0, s
    assert s["colour"] >= 0.75, s


# --------------------------------------------------------------------------- live control (issue 19 A)

def test_a_ten_frame_transition_turns_the_circle_from_red_to_blue_step_by_step(components) -> None:
    """Red → blue over ``transition_frames: 10`` (txt2img, seed 0): the shape colour moves along the
    red → blue line monotonically (the evaluator's position, 0 = red, 1 = blue; its nearest-palette
    name goes red, purple, blue) and the last frame is blue; with 0 frames the next frame is blue."""
    from ditstream.engine.demo.quality import _defaults, transition_readings

    d = _defaults(components)
    glide = transition_readings(components, d, 10, seed=0, before=2, after=1)
    pos = [r["position"] for r in glide]
    assert [r["colour"] for r in glide[:2]] == ["red", "red"] and glide[-2]["colour"] == "blue", glide
    assert all(b >= a - 0.01 for a, b in itertools.pairwise(pos)), pos  # monotonic (evaluator's rounding)
    assert pos[2] < 0.5 < pos[8] and pos[-2] > 0.9, pos  # it glides: no jump on the first frame
    assert all(r["shape"] == "circle" for r in glide), glide
    names = [r["colour"] for r in glide]
    assert names == sorted(names, key=["red", "purple", "blue"].index), names
    jump = transition_readings(components, d, 0, seed=0, before=2, after=1)
    assert [r["colour"] for r in jump] == ["red", "red", "blue"], jump


def test_feedback_halves_flicker_and_still_tracks_a_moving_shape(components) -> None:
    """``feedback: 0.5`` on the near-static noisy clip: the flicker measure drops ≥ 2× against 0
    (full run: docs/demo_model_card.md); the moving-shape clips are still tracked within 4 px."""
    from ditstream.engine.demo.quality import CLIPS, _defaults, flicker_figures, img2img_stream

    d = _defaults(components)
    strength = float(d["strength"])
    f = flicker_figures(components, d, strength, frames=16)
    assert f["feedback_0"] >= 2 * f["feedback_0.5"] > 0, f
    s = img2img_stream(components, d, 16, strength, 1, seed=0, clips=CLIPS[:2], feedback=0.5)
    assert s["centroid_err_mean"] <= 4.0 and s["colour"] >= 0.75, s
