"""Issue 19 A, live creative control: prompt and seed blends, transitions, latent feedback, and the
refusal of bad values (engine, WebSocket in-band, REST 422). Demo-model figures are in
``test_demo_model.py``; isolation with blends in ``test_engine_isolation.py``."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import numpy as np
import pytest
import torch
from ditstream.engine import sampler
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.errors import ValidationError
from ditstream.engine.types import Frame

SIZE = 32
A, B = "a red circle", "a blue square on a white background"


@pytest.fixture(scope="module")
def gen(tiny_components):
    from ditstream.engine.backends import create_backend
    from ditstream.engine.generate import Generator

    return Generator(tiny_components, create_backend("torch", tiny_components))


def _cfg(**kw) -> StreamConfig:
    d = dict(prompt=A, mode="txt2img", steps=1, seed=3, width=SIZE, height=SIZE)
    d.update(kw)
    return StreamConfig(**d)


# ------------------------------------------------------------------------------------ pure math
def test_slerp_keeps_norm_where_lerp_shrinks_it_and_ends_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4096, generator=g)
    mid = sampler.slerp(a, b, 0.5)
    assert abs(float(mid.norm() / a.norm()) - 1) < 0.05
    assert float(((a + b) / 2).norm() / a.norm()) < 0.8  # the washed-out linear mean
    assert torch.equal(sampler.slerp(a, b, 0.0), a) and torch.equal(sampler.slerp(a, b, 1.0), b)
    assert torch.allclose(sampler.slerp(a, a * 2, 0.5), a * 1.5, atol=1e-5)  # parallel: falls back to lerp


def test_blended_noise_has_unit_variance_and_one_seed_is_exact() -> None:
    n1, n2, n3 = (sampler.draw_noise(s, (4, 8, 8), 2) for s in (1, 2, 3))
    mixed = sampler.blend_noise([n1, n2, n3], [1.0, 1.0, 2.0])
    assert torch.allclose(mixed.pow(2).mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert torch.equal(sampler.blend_noise([n1, n2], [1.0, 0.0]), n1)


def test_embedding_blend_pads_and_unites_masks() -> None:
    e1, e2 = torch.ones(1, 3, 4), torch.full((1, 5, 4), 3.0)
    m1, m2 = torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 0, 1, 0]])
    e, m = sampler.blend_embeddings([e1, e2], [m1, m2], [0.5, 0.5])
    assert e.shape == (1, 5, 4) and m.tolist() == [[1, 1, 0, 1, 0]]
    assert torch.allclose(e[0, 0], torch.full((4,), 2.0)) and torch.allclose(e[0, 4], torch.full((4,), 1.5))
    only, mo = sampler.blend_embeddings([e1, e2], [m1, m2], [1.0, 0.0])
    assert only is e1 and mo is m1


# ------------------------------------------------------------------------------------ blends
def test_prompt_blend_weights_one_zero_give_exactly_the_first_prompt(gen) -> None:
    a = gen.generate_unit(_cfg())
    ab = gen.generate_unit(_cfg(prompt=[{"text": A, "weight": 1}, {"text": B, "weight": 0}]))
    assert torch.equal(ab, a)
    b = gen.generate_unit(_cfg(prompt=B))
    for method in ("linear", "slerp"):
        half = _cfg(prompt=[{"text": A, "weight": 0.5}, {"text": B, "weight": 0.5}], prompt_interpolation=method)
        h1, h2 = gen.generate_unit(half), gen.generate_unit(half)
        assert torch.equal(h1, h2)  # deterministic
        assert float((h1 - a).abs().max()) > 1e-3 and float((h1 - b).abs().max()) > 1e-3, method
    # normalised: weights 2/2 are 0.5/0.5
    two = gen.generate_unit(_cfg(prompt=[{"text": A, "weight": 2}, {"text": B, "weight": 2}]))
    half = gen.generate_unit(_cfg(prompt=[{"text": A, "weight": 0.5}, {"text": B, "weight": 0.5}]))
    np.testing.assert_allclose(two.numpy(), half.numpy(), atol=1e-6)


def test_a_blend_costs_no_encoder_call_per_frame(gen) -> None:
    core = EngineCore(gen.components, gen.backend, gen.prompts, EngineConfig())
    sid = core.add(_cfg(prompt=[{"text": A, "weight": 1}, {"text": "a cat", "weight": 2}])).id
    misses = gen.prompts.misses
    for k in range(4):
        core.submit(sid, Frame(image=None, seq=k))
        core.step()
    core.reconfigure(sid, _cfg(prompt=[{"text": A, "weight": 1}, {"text": "a cat", "weight": 2}], transition_frames=3))
    assert gen.prompts.misses == misses


def test_seed_list_of_one_equals_that_seed_and_a_blend_differs(gen) -> None:
    s = gen.generate_unit(_cfg(seed=5))
    assert torch.equal(gen.generate_unit(_cfg(seed=[{"seed": 5, "weight": 1}])), s)
    assert torch.equal(gen.generate_unit(_cfg(seed=[{"seed": 5, "weight": 3}, {"seed": 9, "weight": 0}])), s)
    mix = gen.generate_unit(_cfg(seed=[{"seed": 5, "weight": 1}, {"seed": 9, "weight": 1}]))
    assert float((mix - s).abs().max()) > 1e-3
    assert float((mix - gen.generate_unit(_cfg(seed=9))).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------ transitions
def _stream(gen, cfg, changes_at: dict[int, StreamConfig], frames: int, images=None):
    core = EngineCore(gen.components, gen.backend, gen.prompts, EngineConfig(output_float=True))
    sid = core.add(cfg).id
    out = []
    for k in range(frames):
        if k in changes_at:
            core.reconfigure(sid, changes_at[k])
        core.submit(sid, Frame(image=None if images is None else images[k], seq=k))
        out += core.step()
    out += core.flush()
    assert [o.seq for o in out] == list(range(frames))
    return [o.image for o in out], core.streams[sid]


def test_transition_glides_over_n_frames_and_zero_jumps(gen) -> None:
    a, b = _cfg(), _cfg(prompt=B, seed=[{"seed": 3}, {"seed": 8}], guidance_scale=2.0)
    img_a, img_b = gen.generate_unit(a).numpy(), gen.generate_unit(b).numpy()
    jump, _ = _stream(gen, a, {2: b}, 4)
    np.testing.assert_allclose(jump[1], img_a, atol=1e-5)
    np.testing.assert_allclose(jump[2], img_b, atol=1e-5)  # 0 frames: the very next frame is b
    n = 4
    glide, state = _stream(gen, a, {2: b.replace(transition_frames=n)}, 2 + n + 1)
    np.testing.assert_allclose(glide[1], img_a, atol=1e-5)
    dist = [float(np.abs(im - img_b).mean()) for im in glide[2:]]
    assert all(d > 1e-4 for d in dist[: n - 1]), dist  # in between: neither end
    assert dist[n - 1] < 1e-5 and dist[n] < 1e-5, dist  # frame n is b, and it stays there
    assert dist[0] > dist[n - 2], dist
    assert state.transition is None


def test_a_config_mid_transition_starts_from_where_the_stream_is(gen) -> None:
    from ditstream.engine.plan import glide

    a, b, c = _cfg(), _cfg(prompt=B, transition_frames=4), _cfg(prompt="a cat", transition_frames=2)
    core = EngineCore(gen.components, gen.backend, gen.prompts, EngineConfig(output_float=True))
    state = core.add(a)
    plan_a = state.plan
    core.reconfigure(state.id, b)
    plan_b = state.transition.target
    for k in range(2):
        core.submit(state.id, Frame(image=None, seq=k))
        core.step()
    here = glide(plan_a, plan_b, 0.5)
    core.reconfigure(state.id, c)
    assert torch.equal(state.transition.start.embeds, here.embeds)
    assert torch.equal(state.transition.start.guidance, here.guidance)


def test_a_size_change_cannot_glide_and_jumps(gen) -> None:
    core = EngineCore(gen.components, gen.backend, gen.prompts, EngineConfig())
    state = core.add(_cfg())
    core.reconfigure(state.id, _cfg(width=2 * SIZE, transition_frames=5))
    assert state.transition is None and state.plan.config.width == 2 * SIZE


# ------------------------------------------------------------------------------------ feedback
def _noisy_static(n: int) -> list[np.ndarray]:
    rs = np.random.RandomState(0)
    base = (rs.rand(4, 4, 3) * 255).repeat(SIZE // 4, 0).repeat(SIZE // 4, 1)
    return [np.clip(base + rs.normal(0, 20, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def test_feedback_mixes_the_previous_output_and_zero_is_the_plain_stream(gen) -> None:
    clip = _noisy_static(6)
    cfg = _cfg(mode="img2img", strength=0.7, steps=2)
    plain, _ = _stream(gen, cfg, {}, 6, clip)
    off, _ = _stream(gen, cfg.replace(feedback=0.0), {}, 6, clip)
    fed, _ = _stream(gen, cfg.replace(feedback=0.6), {}, 6, clip)
    for k in range(6):
        np.testing.assert_allclose(off[k], plain[k], atol=0)
    # 2 steps: frame k enters while frame k-1 is still in the model; it gets the newest output, frame k-2's
    for k in range(2):
        np.testing.assert_allclose(fed[k], plain[k], atol=1e-6)  # nothing to feed back yet
    assert all(float(np.abs(fed[k] - plain[k]).max()) > 1e-4 for k in range(2, 6))
    from ditstream.engine.demo.quality import flicker

    assert flicker(fed) < flicker(plain)


# ------------------------------------------------------------------------------------ refusals
BAD = [
    ({"prompt": [{"text": A, "weight": -1}]}, "prompt"),
    ({"prompt": [{"text": A, "weight": 0}, {"text": B, "weight": 0}]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [{"text": A, "weight": math.inf}]}, "prompt"),
    ({"seed": [{"seed": 1, "weight": -0.5}]}, "seed"),
    ({"seed": [{"seed": 1, "weight": 0}]}, "seed"),
    ({"seed": []}, "seed"),
    ({"seed": [{"seed": -1}]}, "seed"),
    ({"feedback": 1.0}, "feedback"),
    ({"feedback": -0.1}, "feedback"),
    ({"prompt_interpolation": "cubic"}, "prompt_interpolation"),
    ({"transition_frames": -1}, "transition_frames"),
]


@pytest.mark.parametrize(("changes", "field"), BAD)
def test_engine_refuses_bad_values_naming_the_field(changes, field) -> None:
    with pytest.raises(ValidationError) as err:
        _cfg(**changes).validate()
    assert err.value.field == field
    assert field in str(err.value)


@pytest.fixture(scope="module")
def null_server():
    from ditstream.engine.null import null_runner
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings

    from ditstream.bench.harness import ServerThread

    app = create_app(Settings(model="null", default_width=64, default_height=64), null_runner())
    with ServerThread(app) as srv:
        yield srv


def test_websocket_answers_bad_values_in_band_and_keeps_the_stream(null_server) -> None:
    import websockets
    from testkit import recv_json

    async def main():
        async with websockets.connect(null_server.ws_url, max_size=None) as ws:
            assert (await recv_json(ws))["type"] == "ready"
            for changes, field in BAD:
                await ws.send(json.dumps({"type": "config", **changes}))
                err = await recv_json(ws)
                assert (err["type"], err["code"]) == ("error", "validation_error"), err
                assert err["field"].split(".")[0] == field, (changes, err)
                await ws.send(json.dumps({"type": "ping", "ts": 1}))  # resets the bad-message count
                assert (await recv_json(ws))["type"] == "pong"
            good = {"prompt": [{"text": A, "weight": 1}, {"text": B, "weight": 3}], "prompt_interpolation": "slerp",
                    "seed": [{"seed": 1, "weight": 1}, {"seed": 2, "weight": 1}], "transition_frames": 5,
                    "feedback": 0.5}
            await ws.send(json.dumps({"type": "config", **good}))
            applied = (await recv_json(ws))["applied"]
            assert applied["prompt"] == [{"text": A, "weight": 1.0}, {"text": B, "weight": 3.0}]
            assert applied["seed"][1] == {"seed": 2, "weight": 1.0}
            assert (applied["prompt_interpolation"], applied["transition_frames"], applied["feedback"]) == (
                "slerp", 5, 0.5)

    asyncio.run(main())


def test_rest_takes_a_prompt_blend_and_answers_422_for_bad_ones(null_server) -> None:
    url = null_server.url + "/v1/images/generations"
    ok = httpx.post(url, json={"prompt": "x", "size": "64x64", "prompt_interpolation": "slerp",
                               "prompts": [{"text": A, "weight": 1}, {"text": B, "weight": 1}]}, timeout=30)
    assert ok.status_code == 200, ok.text
    for prompts, where in (([{"text": A, "weight": -1}], "prompt"), ([], "prompt"),
                           ([{"text": A, "weight": 0}], "prompt"), ([{"text": A, "wait": 1}], "prompts"),
                           # each finite, their sum not (found by test_reliability_schema: a 500 before)
                           ([{"text": A, "weight": 1.5e308}, {"text": B, "weight": 1e308}], "sum past")):
        r = httpx.post(url, json={"prompt": "x", "size": "64x64", "prompts": prompts}, timeout=30)
        assert r.status_code == 422, (prompts, r.text)
        assert where in r.text, r.text
    r = httpx.post(url, json={"prompt": "x", "prompts": [{"text": A}], "prompt_interpolation": "cubic"}, timeout=30)
    assert r.status_code == 422 and "prompt_interpolation" in r.text


def test_rest_takes_prompts_without_prompt_and_names_prompt_when_neither_is_given(null_server) -> None:
    """The ``openai`` client always sends ``prompt``; a curl user with a blend need not."""
    url = null_server.url + "/v1/images/generations"
    r = httpx.post(url, json={"size": "64x64", "prompts": [{"text": A, "weight": 1}, {"text": B, "weight": 2}]},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["revised_prompt"] is None  # nothing to echo: no prompt was sent
    r = httpx.post(url, json={"size": "64x64"}, timeout=30)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("validation_error", "prompt") and "prompts" in error["message"], error
