"""A new user's first run: ``ditstream serve`` on the demo model, its defaults and the test pattern.

The expected values are read from the demo's ``ditstream.json``, never restated here; the pictures
are judged by the demo's model-independent evaluator (``engine/demo/evaluator.py``).
"""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
from ditstream.clients.media import PATTERN_BACKGROUND, pattern_frames, pattern_position
from ditstream.engine.config import ModelConfig, StreamConfig
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import read_image
from ditstream.engine.errors import ModelLoadError
from ditstream.engine.loader import DEMO_MODEL_DIR, FALLBACK_DEFAULTS, load_components

DEMO_DEFAULTS = json.loads((DEMO_MODEL_DIR / "ditstream.json").read_text())["defaults"]


def caption_of(prompt: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a prompt that is one of the demo's training captions."""
    for cap in ds.all_captions():
        if ds.caption_for(*cap) == prompt:
            return cap
    raise AssertionError(f"{prompt!r} is not a caption the demo model was trained on")


@pytest.fixture(scope="module")
def demo_components():
    return load_components(ModelConfig(model="demo", device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def demo_app(demo_components):
    from ditstream.engine.backends import create_backend
    from ditstream.engine.core import EngineCore
    from ditstream.engine.prompt_cache import PromptCache
    from ditstream.engine.runner import EngineRunner
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings

    # EngineRunner.from_config, sharing the module's loaded components.
    backend = create_backend("torch", demo_components)
    runner = EngineRunner(EngineCore(demo_components, backend, PromptCache(demo_components)))
    runner.info = {"model": "demo", "backend": backend.name, "device": "cpu", "dtype": "float32",
                   "size_multiple": runner.core.size_multiple, "defaults": demo_components.defaults}
    return create_app(Settings(model="demo"), runner)


# --------------------------------------------------------------------------- loader

def test_demo_states_a_prompt_it_was_trained_on(demo_components) -> None:
    assert "prompt" in DEMO_DEFAULTS
    caption_of(DEMO_DEFAULTS["prompt"])
    assert {k: demo_components.defaults[k] for k in DEMO_DEFAULTS} == DEMO_DEFAULTS


def test_a_folder_without_defaults_gets_the_fallbacks_and_bad_defaults_are_refused(tmp_path, tiny_model_dir) -> None:
    assert "defaults" not in json.loads((tiny_model_dir / "ditstream.json").read_text())
    c = load_components(ModelConfig(model=str(tiny_model_dir)))
    assert c.defaults == FALLBACK_DEFAULTS
    assert (c.defaults["width"], c.defaults["height"]) == (1024, 1024) and c.defaults["prompt"]
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    extra = json.loads((model / "ditstream.json").read_text())
    (model / "ditstream.json").write_text(json.dumps({**extra, "defaults": {"width": 32, "prompt": "a cat"}}))
    assert load_components(ModelConfig(model=str(model))).defaults == {**FALLBACK_DEFAULTS, "width": 32,
                                                                       "prompt": "a cat"}
    for bad in ({"width": "64"}, {"steps": True}, {"colour": "red"}, ["width"]):
        (model / "ditstream.json").write_text(json.dumps({**extra, "defaults": bad}))
        with pytest.raises(ModelLoadError, match="defaults"):
            load_components(ModelConfig(model=str(model)))


# --------------------------------------------------------------------------- server

def test_ready_and_models_carry_the_demo_defaults(demo_app) -> None:
    from fastapi.testclient import TestClient

    want = {k: DEMO_DEFAULTS[k] for k in ("prompt", "width", "height", "steps", "strength", "guidance_scale")}
    native = f"{DEMO_DEFAULTS['width']}x{DEMO_DEFAULTS['height']}"
    with TestClient(demo_app) as client:
        card = client.get("/v1/models").json()["data"][0]
        with client.websocket_connect("/v1/stream", subprotocols=["ditstream"]) as ws:
            ready = ws.receive_json()
    assert card["id"] == "demo"
    assert card["defaults"] == want, card
    assert card["native_size"] == native
    assert card["size_multiple"] == 8
    assert ready["type"] == "ready"
    assert ready["model"]["defaults"] == want, ready
    assert ready["model"]["native_size"] == native
    assert ready["model"]["size_multiple"] == ready["limits"]["size_multiple"] == 8
    assert {k: ready["config"][k] for k in want} == want  # the stream starts with them


def test_the_servers_size_overrides_the_models_only_when_given(demo_app) -> None:
    from ditstream.server.api.state import state_of
    from ditstream.server.settings import Settings

    state = state_of(demo_app)
    assert (state.stream_defaults()["width"], state.stream_defaults()["height"]) == (64, 64)
    state.settings = Settings(model="demo", default_width=128, default_height=96)
    try:
        card = state.model_card()
        assert (card["defaults"]["width"], card["defaults"]["height"]) == (128, 96)
        assert card["native_size"] == "64x64" and card["defaults"]["prompt"] == DEMO_DEFAULTS["prompt"]
    finally:
        state.settings = Settings(model="demo")


# --------------------------------------------------------------------------- what the demo draws

def test_the_demo_draws_its_default_prompt(demo_components) -> None:
    """txt2img at the default prompt and settings: the captioned shape, not a blank or a white blob."""
    from ditstream.engine.generate import Generator

    gen = Generator(demo_components)
    shape, colour, background = caption_of(DEMO_DEFAULTS["prompt"])
    bg = np.array(ds.COLOURS[background], np.float32)
    for seed in range(4):
        cfg = StreamConfig(prompt=DEMO_DEFAULTS["prompt"], mode="txt2img", seed=seed,
                           **{k: DEMO_DEFAULTS[k] for k in ("width", "height", "steps", "guidance_scale")})
        image = gen.generate(cfg)
        # Measurably not the background: a good share of pixels far from it.
        far = np.abs(image.astype(np.float32) - bg).max(axis=-1) > 60
        assert far.mean() > 0.05, (seed, far.mean())
        r = read_image(image)
        assert (r.shape, r.colour, r.background) == (shape, colour, background), (seed, r)


def test_img2img_of_the_test_pattern_at_the_defaults_keeps_the_circle_and_takes_the_prompt(demo_components) -> None:
    """What the page shows on Start: the client's pattern (the page draws the same), one-step img2img
    at the default prompt and strength: a circle where the pattern's is, in the prompt's colour."""
    from ditstream.engine.generate import Generator

    gen = Generator(demo_components)
    w, h = DEMO_DEFAULTS["width"], DEMO_DEFAULTS["height"]
    shape, colour, background = caption_of(DEMO_DEFAULTS["prompt"])
    frames = list(itertools.islice(pattern_frames(w, h), 0, 60, 15))
    pattern = read_image(frames[0])
    assert (pattern.shape, pattern.background) == ("circle", background)  # the pattern is in the demo's world
    assert tuple(frames[0][0, 0]) == PATTERN_BACKGROUND
    for i, frame in enumerate(frames):
        cfg = StreamConfig(prompt=DEMO_DEFAULTS["prompt"], mode="img2img", seed=i, width=w, height=h,
                           steps=DEMO_DEFAULTS["steps"], strength=DEMO_DEFAULTS["strength"],
                           guidance_scale=DEMO_DEFAULTS["guidance_scale"])
        r = read_image(gen.generate(cfg, frame))
        assert (r.shape, r.colour, r.background) == (shape, colour, background), (i, r)
        cx, cy, _ = pattern_position(w, h, i * 15 * 1000 / 30)
        assert np.hypot(r.centroid[0] - cx, r.centroid[1] - cy) < 4.0, (i, r.centroid, (cx, cy))
