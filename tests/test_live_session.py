"""The one definition of glass-to-glass (``server/live/timing.py``) and who reports it.

WebSocket frames (``server_ms`` and ``ditstream_e2e_seconds``), WebRTC outputs and REST requests
(``ditstream_e2e_seconds``) once each timed it their own way (arrival to send; the engine's own
total; request to result, before coding). Now each reports what ``timing.glass_to_glass`` says, from
the arrival it stamped: with that function held at a fixed answer, every transport reports exactly
that answer, for every output.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import websockets
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.live import timing
from ditstream.server.settings import Settings
from test_webrtc import Publisher
from testkit import frame_message, jpeg, recv_frame, recv_json

from ditstream.bench.harness import ServerThread

SIZE = 64
G2G = 0.25  # seconds: exact in binary, so a sum of them is exact too
TIMEOUT = 30.0


def test_glass_to_glass_is_arrival_to_departure():
    assert timing.glass_to_glass(10.0, 10.25) == 0.25
    assert timing.glass_to_glass(10.0, 10.25, engine_total_s=3.0, encode_s=1.0) == 0.25  # arrival known: it rules
    assert timing.glass_to_glass(None, 10.25, engine_total_s=0.125, encode_s=0.0625) == 0.1875  # not kept


def test_arrivals_number_unnumbered_frames_after_the_last_and_forget_old_ones():
    arrivals = timing.Arrivals()
    assert arrivals.arrive(None, 1.0) == 0
    assert arrivals.arrive(7, 2.0) == 7
    assert arrivals.arrive(None, 3.0) == 8  # previous + 1, as the protocol says for bare frames
    arrivals.decoded(8, 3.5)
    assert arrivals.depart(8) == (3.0, 0.5)
    assert arrivals.depart(8) == (None, 0.0)  # forgotten once it left
    for seq in range(9, 9 + timing.MAX_TRACKED_FRAMES + 1):
        arrivals.arrive(seq, 4.0)
    assert 0 not in arrivals and 9 not in arrivals and 10 in arrivals  # bounded: the oldest go


@pytest.fixture
def fixed_g2g(monkeypatch):
    """``timing.glass_to_glass`` answering G2G always; its calls as (received_at, sent_at)."""
    calls: list[tuple[float | None, float]] = []

    def fixed(received_at, sent_at, engine_total_s=0.0, encode_s=0.0):
        calls.append((received_at, sent_at))
        return G2G

    monkeypatch.setattr(timing, "glass_to_glass", fixed)
    return calls


def _e2e(srv) -> tuple[float, float]:
    """(count, sum) of ``ditstream_e2e_seconds`` so far."""
    (metric,) = srv.app.state.ditstream.metrics.e2e_seconds.collect()
    samples = {s.name: s.value for s in metric.samples}
    return samples["ditstream_e2e_seconds_count"], samples["ditstream_e2e_seconds_sum"]


def _assert_all_g2g(srv, before: tuple[float, float], what: str) -> None:
    count, total = _e2e(srv)
    n = count - before[0]
    assert n > 0, f"{what}: nothing observed"
    assert total - before[1] == G2G * n, f"{what}: {n} observations sum to {total - before[1]}, not {G2G * n}"


def test_every_transport_reports_the_one_glass_to_glass(fixed_g2g):
    app = create_app(Settings(model="null", default_width=SIZE, default_height=SIZE), null_runner())
    image = jpeg(np.full((SIZE, SIZE, 3), 90, np.uint8))

    async def websocket(srv) -> None:
        before = _e2e(srv)
        async with websockets.connect(srv.ws_url, max_size=None) as ws:
            assert (await recv_json(ws))["type"] == "ready"
            for seq in range(3):
                await ws.send(frame_message(image, seq))
                header, _ = await recv_frame(ws)
                assert header["timings"]["server_ms"] == G2G * 1e3, header
        _assert_all_g2g(srv, before, "websocket")

    async def webrtc(srv) -> None:
        before = _e2e(srv)
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            pub = Publisher(np.zeros((SIZE, SIZE, 3), np.uint8))
            assert (await pub.publish(client, "?mode=txt2img&prompt=ticking&fps=30")).status_code == 201
            deadline = time.monotonic() + TIMEOUT
            while _e2e(srv)[0] - before[0] < 3:
                assert time.monotonic() < deadline, "no WebRTC outputs"
                await asyncio.sleep(0.01)
            assert (await client.delete(pub.location)).status_code == 200
            await pub.pc.close()
        _assert_all_g2g(srv, before, "webrtc")

    async def rest(srv) -> None:
        before = _e2e(srv)
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            r = await client.post("/v1/images/generations", json={"prompt": "x", "n": 2, "size": f"{SIZE}x{SIZE}"})
            assert r.status_code == 200, r.text
        _assert_all_g2g(srv, before, "rest")

    with ServerThread(app) as srv:
        for transport in (websocket, webrtc, rest):
            calls = len(fixed_g2g)
            asyncio.run(transport(srv))
            new = fixed_g2g[calls:]
            assert new and all(r is not None and r <= s for r, s in new), (transport.__name__, new)
