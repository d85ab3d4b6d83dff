"""A failed model call over a real server: in-band WS error then the next frame; REST 500 then 200.

The runner is the tiny model's, its torch backend wrapped by ``faults.FaultyBackend``; the fault
is queued before the request that hits it, and every wait is on a reply, never a sleep.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import websockets
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from faults import ILLEGAL_ACCESS, faulty_runner, width_is
from testkit import frame_message, jpeg, recv_frame, recv_json

from ditstream.bench.harness import ServerThread

SMALL, BIG = 32, 64


def _image(seed: int, size: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)


@pytest.fixture
def faulty_server(tiny_model_dir):
    runner, backend = faulty_runner(tiny_model_dir)
    app = create_app(Settings(model=str(tiny_model_dir), default_width=SMALL, default_height=SMALL), runner)
    with ServerThread(app) as srv:
        yield srv, runner, backend


async def _open(url: str, **config) -> websockets.ClientConnection:
    ws = await websockets.connect(url, max_size=None)
    assert (await recv_json(ws))["type"] == "ready"
    if config:
        await ws.send(json.dumps({"type": "config", **config}))
        reply = await recv_json(ws)
        assert reply["type"] == "config", reply
    return ws


def _metric(text: str, line_start: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start))


def test_ws_gets_an_in_band_error_for_the_failed_frame_and_goes_on(faulty_server, tiny_components):
    srv, runner, backend = faulty_server
    scale = tiny_components.vae_scale_factor

    async def main():
        small = await _open(srv.ws_url)
        big = await _open(srv.ws_url, width=BIG, height=BIG)  # never shares a call with the small stream
        try:
            for seq in range(5):
                if seq == 2:
                    fault = backend.inject("denoise", error=RuntimeError("transformer exploded"),
                                           when=width_is(SMALL, scale))
                await small.send(frame_message(jpeg(_image(seq, SMALL)), seq))
                await big.send(frame_message(jpeg(_image(seq, BIG)), seq))
                if seq == 2:
                    err = await recv_json(small)
                    assert fault.fired.is_set()
                    assert err["type"] == "error" and err["code"] == "generation_error" and err["seq"] == 2
                    assert "transformer exploded" in err["message"]
                else:
                    texts: list[dict] = []
                    head, img = await recv_frame(small, texts=texts)
                    assert head["seq"] == seq and img.shape == (SMALL, SMALL, 3) and not texts
                head, img = await recv_frame(big)  # the other stream never noticed
                assert head["seq"] == seq and img.shape == (BIG, BIG, 3)
        finally:
            await small.close()
            await big.close()

    asyncio.run(main())
    assert runner.alive
    metrics = httpx.get(srv.url + "/metrics").text
    assert _metric(metrics, 'ditstream_model_failures_total{stage="denoise"}') == 1
    assert _metric(metrics, 'ditstream_frames_total{outcome="failed"}') == 1
    assert _metric(metrics, "ditstream_failed_frames_total") == 1
    assert httpx.get(srv.url + "/health").status_code == 200


def test_rest_answers_500_for_the_failed_job_then_200(faulty_server):
    srv, runner, backend = faulty_server
    body = {"prompt": "a cat", "size": f"{SMALL}x{SMALL}", "response_format": "b64_json", "seed": 1}
    backend.inject("decode", error=RuntimeError("decoder exploded"))
    r = httpx.post(srv.url + "/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_error" and err["type"] == "server_error" and "decoder exploded" in err["message"]
    backend.inject("denoise", nan_samples=(0,))
    r = httpx.post(srv.url + "/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert runner.alive and runner.stats()["failed_frames"] == 2
    metrics = httpx.get(srv.url + "/metrics").text
    assert _metric(metrics, 'ditstream_model_failures_total{stage="decode"}') == 1
    assert _metric(metrics, 'ditstream_model_failures_total{stage="nonfinite"}') == 1


def test_an_unrecoverable_device_error_ends_the_engine_and_health_turns_503(faulty_server):
    srv, runner, backend = faulty_server
    assert httpx.get(srv.url + "/health").status_code == 200
    backend.inject("denoise", error=RuntimeError(ILLEGAL_ACCESS))
    body = {"prompt": "a cat", "size": f"{SMALL}x{SMALL}", "response_format": "b64_json"}
    r = httpx.post(srv.url + "/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert not runner.alive
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 503 and "illegal memory access" in health.json()["error"]
    assert httpx.get(srv.url + "/ready").status_code == 503
