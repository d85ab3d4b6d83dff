"""REST in the OpenAI Images API shape, proven with the unmodified ``openai`` client.

Every test runs twice (``tests/serverkit.py``): against the in-process engine and against the Redis
gateway with ``ditstream worker`` processes on the same model.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from ditstream.engine.config import EngineConfig, ModelConfig
from ditstream.engine.null import null_runner
from ditstream.engine.runner import EngineRunner
from PIL import Image
from serverkit import KINDS, SLOW_DELAY_S, runner_of, serve

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module", params=KINDS)
def tiny_server(request, tiny_model_dir):
    def runner():
        return EngineRunner.from_config(ModelConfig(model=str(tiny_model_dir)), EngineConfig())

    with serve(request, "tiny_fleet", runner, model=str(tiny_model_dir), default_width=32, default_height=32,
               api_keys=[KEY]) as srv:
        yield srv


@pytest.fixture(params=KINDS)
def slow_server(request):
    """``slow_server(**settings)``: a server on the null engine taking ``SLOW_DELAY_S`` per tick."""
    return lambda **settings: serve(request, "slow_null_fleet",
                                    lambda: null_runner(EngineConfig(), delay_s=SLOW_DELAY_S),
                                    model="null", default_width=64, default_height=64, **settings)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_generate_and_edit(tiny_server, tmp_path):
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)
    res = client.images.generate(model="ditstream", prompt="a red circle", size="32x48", n=2,
                                 response_format="b64_json", extra_body={"seed": 3})
    images = [_png(d.b64_json) for d in res.data]
    assert [im.size for im in images] == [(32, 48), (32, 48)] and images[0].format == "PNG"
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "n images use different seeds"
    again = client.images.generate(prompt="a red circle", size="32x48", extra_body={"seed": 3})
    assert np.array_equal(np.asarray(_png(again.data[0].b64_json)), np.asarray(images[0])), "seeded = repeatable"

    src = tmp_path / "in.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(src)
    with open(src, "rb") as f:
        edit = client.images.edit(image=f, prompt="a blue square", size="32x32",
                                  extra_body={"strength": 0.5, "seed": 1})
    assert _png(edit.data[0].b64_json).size == (32, 32)
    with open(src, "rb") as f:  # no size: the image's own, rounded to the model's multiple
        edit = client.images.edit(image=f, prompt="a blue square", output_format="jpeg")
    out = Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json)))
    assert out.size == (40, 40) and out.format == "JPEG"

    models = client.models.list()
    assert [m.id for m in models.data] == [str(tiny_server.app.state.ditstream.settings.model)]


def test_the_gateway_relays_the_image_its_worker_coded(tiny_server, monkeypatch):
    """Through a gateway the worker codes the result in the requested format and the gateway sends
    those bytes as they are (no decode and re-encode, a coded image on the reply stream instead of
    raw pixels); in process the server codes it. Same images either way (PNG is lossless)."""
    from ditstream.server.api import rest

    coded: list[str] = []
    real = rest.codec.encode
    monkeypatch.setattr(rest.codec, "encode", lambda image, fmt, q: coded.append(fmt) or real(image, fmt, q))
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)
    for fmt in ("png", "webp", "jpeg"):
        res = client.images.generate(prompt="a red circle", size="32x32", n=2, output_format=fmt,
                                     extra_body={"seed": 5})
        assert [_png(d.b64_json).format for d in res.data] == [fmt.upper()] * 2 and res.size == "32x32"
    gateway = runner_of(tiny_server).info.get("mode") == "gateway"
    assert coded == ([] if gateway else ["png"] * 2 + ["webp"] * 2 + ["jpeg"] * 2), coded


def test_openai_client_sees_typed_errors(tiny_server):
    bad = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="x")
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.images.generate(prompt="x" * 2001)
    assert info.value.body["code"] == "validation_error" and info.value.body["param"] == "prompt"
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt="x", size="33x32")  # not a multiple of the model's size multiple


def test_ops_endpoints_are_open_and_metrics_named(tiny_server):
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    ready = httpx.get(tiny_server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in ("ditstream_streams_active", "ditstream_frames_total", "ditstream_requests_total",
                 "ditstream_rejected_total", "ditstream_queue_seconds", "ditstream_inference_seconds",
                 "ditstream_e2e_seconds", "ditstream_batch_size", "ditstream_workers_up"):
        assert name in text, name
    assert 'ditstream_requests_total{code="200",route="/health"}' in text
    assert httpx.get(tiny_server.url + "/v1/models").status_code == 401
    schema = httpx.get(tiny_server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models"} <= set(schema["paths"])


def test_full_queue_answers_429_with_retry_after(slow_server):
    with slow_server(max_queued_jobs=1, retry_after_s=2) as srv:
        app = srv.app
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(
            srv.url + "/v1/images/generations", json={"prompt": "slow"}, timeout=30)))
        t.start()
        jobs = app.state.ditstream.admission.jobs
        assert _wait_for(lambda: jobs.in_use == 1)
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x"})
        t.join()
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "overloaded"
        assert first["r"].status_code == 200
        assert jobs.in_use == 0
        ok = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x", "n": 1}, timeout=30)
        assert ok.status_code == 200


def test_a_client_that_leaves_cancels_its_queued_jobs(slow_server):
    with slow_server() as srv:
        app, runner = srv.app, runner_of(srv)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x", "n": 4}, timeout=0.05)
        # The server noticed the disconnect (499 = cancelled), not a completed request (200).
        assert _wait_for(lambda: 'code="499",route="/v1/images/generations"' in httpx.get(srv.url + "/metrics").text)
        assert _wait_for(lambda: runner.stats()["jobs"] == 0)
        assert app.state.ditstream.admission.jobs.in_use == 0
        assert 'code="200",route="/v1/images/generations"' not in httpx.get(srv.url + "/metrics").text


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())
