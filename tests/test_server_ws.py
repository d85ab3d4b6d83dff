"""Integration tests of ``/v1/stream`` against a real uvicorn server on loopback.

The tiny real-class model makes prompts matter (prompt change, isolation); the null engine makes
the server's own paths (order, txt2img pacing, admission, cleanup) fast and deterministic.
Every test but one runs twice (``tests/serverkit.py``): against the in-process engine and against
the Redis gateway with ``ditstream worker`` processes on the same model.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import websockets
from ditstream.engine.config import EngineConfig, ModelConfig
from ditstream.engine.null import null_runner
from ditstream.engine.runner import EngineRunner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from serverkit import KINDS, SLOW_DELAY_S, runner_of, serve
from testkit import frame_message, jpeg, recv_frame, recv_json

from ditstream.bench.harness import ServerThread

SIZE = 32


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random image (survives JPEG): 4x4 random colours, upsampled."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size // 4, size // 4, 1), np.uint8))


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.fixture(scope="module", params=KINDS)
def tiny_server(request, tiny_model_dir):
    def runner():
        return EngineRunner.from_config(ModelConfig(model=str(tiny_model_dir)), EngineConfig())

    with serve(request, "tiny_fleet", runner, model=str(tiny_model_dir), default_width=SIZE,
               default_height=SIZE) as srv:
        yield srv


@pytest.fixture(scope="module", params=KINDS)
def null_server(request):
    with serve(request, "null_fleet", null_runner, model="null", default_width=64, default_height=64,
               max_streams=4) as srv:
        yield srv


@pytest.fixture(params=KINDS)
def slow_server(request):
    """``slow_server(**settings)``: a server on the null engine taking ``SLOW_DELAY_S`` per tick."""
    return lambda **settings: serve(request, "slow_null_fleet", lambda: null_runner(delay_s=SLOW_DELAY_S),
                                    model="null", default_width=64, default_height=64, **settings)


async def _open(url: str, **config) -> websockets.ClientConnection:
    ws = await websockets.connect(url, max_size=None)
    ready = await recv_json(ws)
    assert ready["type"] == "ready"
    if config:
        await ws.send(json.dumps({"type": "config", **config}))
        reply = await recv_json(ws)
        assert reply["type"] == "config", reply
    return ws


async def _lockstep(ws, data: bytes, seqs: range) -> list[tuple[dict, np.ndarray]]:
    out = []
    for seq in seqs:
        await ws.send(frame_message(data, seq))
        out.append(await recv_frame(ws))
    return out


def test_frames_come_back_in_order_with_their_seq(null_server):
    async def main():
        ws = await _open(null_server.ws_url)
        img = _image(1, 64)
        # Lock-step: every frame answered, same seq and ts, the echo engine returns the input.
        for seq in (5, 6, 7, 100):
            ts = 1000.0 + seq
            await ws.send(frame_message(jpeg(img), seq, ts))
            header, out = await recv_frame(ws)
            assert (header["seq"], header["ts"], header["skipped"]) == (seq, ts, False)
            assert _diff(out, img) < 8  # JPEG twice
            assert set(header["timings"]) >= {"decode_ms", "queue_ms", "inference_ms", "encode_ms", "server_ms"}
        # A burst: latest wins may drop frames, but what arrives is in order and ends with the last.
        data = jpeg(img)
        for seq in range(200, 240):
            await ws.send(frame_message(data, seq))
        seen = []
        while not seen or seen[-1] != 239:
            header, _ = await recv_frame(ws)
            seen.append(header["seq"])
        assert seen == sorted(set(seen)) and set(seen) <= set(range(200, 240))
        # Bare images (no header) get server-assigned increasing seqs.
        await ws.send(data)
        header, _ = await recv_frame(ws)
        assert header["seq"] == 240
        await ws.close()

    asyncio.run(main())


def test_prompt_change_takes_effect_within_two_frames(tiny_server):
    async def main():
        data = jpeg(_image(3))
        ref = await _open(tiny_server.ws_url, prompt="a blue square", seed=7)
        (_, ref_out), = await _lockstep(ref, data, range(1))
        await ref.close()

        ws = await _open(tiny_server.ws_url, prompt="a red circle", seed=7)
        before = await _lockstep(ws, data, range(3))
        assert all(_diff(out, ref_out) > 2.0 for _, out in before), "prompts must give different images"
        await ws.send(json.dumps({"type": "config", "prompt": "a blue square"}))  # no waiting for "applied"
        after = await _lockstep(ws, data, range(3, 6))
        first_new = next(i for i, (_, out) in enumerate(after) if _diff(out, ref_out) < 1.0)
        assert first_new <= 1, f"the new prompt showed only at frame {first_new + 1} after the change"
        assert all(_diff(out, ref_out) < 1.0 for _, out in after[first_new:])
        await ws.close()

    asyncio.run(main())


def test_two_streams_never_receive_each_others_frames(tiny_server):
    async def main():
        inputs = {"a": (_image(10), "a red circle", 1000), "b": (_image(11), "a green star", 5000)}
        refs = {}
        for name, (img, prompt, _) in inputs.items():
            ws = await _open(tiny_server.ws_url, prompt=prompt, seed=1)
            (_, refs[name]), = await _lockstep(ws, jpeg(img), range(1))
            await ws.close()
        assert _diff(refs["a"], refs["b"]) > 5.0

        async def run(name: str, ws) -> list[tuple[dict, np.ndarray]]:
            img, _, base = inputs[name]
            return await _lockstep(ws, jpeg(img), range(base, base + 6))

        socks = {n: await _open(tiny_server.ws_url, prompt=p, seed=1) for n, (_, p, _) in inputs.items()}
        results = dict(zip(socks, await asyncio.gather(*(run(n, ws) for n, ws in socks.items())), strict=True))
        for name, outs in results.items():
            base = inputs[name][2]
            other = "b" if name == "a" else "a"
            for i, (header, out) in enumerate(outs):
                assert header["seq"] == base + i
                assert _diff(out, refs[name]) < 1.0 < _diff(out, refs[other])
        for ws in socks.values():
            await ws.close()

    asyncio.run(main())


def test_txt2img_pushes_frames_at_the_requested_fps(null_server):
    async def main():
        ws = await _open(null_server.ws_url)
        await ws.send(json.dumps({"type": "config", "mode": "txt2img", "fps": 12}))
        texts: list[dict] = []
        header, _ = await recv_frame(ws, texts=texts)
        t0, n0 = time.perf_counter(), header["seq"]
        count = 0
        while time.perf_counter() - t0 < 3.0:
            header, img = await recv_frame(ws)
            count += 1
        fps = count / (time.perf_counter() - t0)
        assert abs(fps - 12) <= 12 * 0.2, f"{fps:.1f} fps delivered for 12 asked"
        assert header["seq"] > n0 and img.shape == (64, 64, 3)
        await ws.close()

    asyncio.run(main())


def test_txt2img_on_the_tiny_model(tiny_server):
    async def main():
        ws = await _open(tiny_server.ws_url, mode="txt2img", fps=5, prompt="a cat")
        seqs = [(await recv_frame(ws))[0]["seq"] for _ in range(3)]
        assert seqs == sorted(seqs)
        await ws.close()

    asyncio.run(main())


def test_live_size_change_and_config_reply(null_server):
    async def main():
        ws = await _open(null_server.ws_url)
        await ws.send(json.dumps({"type": "config", "size": "32x48", "strength": 0.9,
                                  "filter": {"enabled": False}}))
        reply = await recv_json(ws)
        assert reply["applied"]["width"] == 32 and reply["applied"]["height"] == 48
        assert reply["applied"]["strength"] == 0.9
        await ws.send(frame_message(jpeg(_image(4, 64)), 1))  # old size: refused, stream goes on
        err = await recv_json(ws)
        assert (err["type"], err["code"], err["field"]) == ("error", "validation_error", "size")
        img = np.zeros((48, 32, 3), np.uint8)
        await ws.send(frame_message(jpeg(img), 2))
        header, out = await recv_frame(ws)
        assert header["seq"] == 2 and out.shape == (48, 32, 3)
        await ws.close()

    asyncio.run(main())


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_disconnect_frees_the_stream_and_admission_refuses_with_1013(slow_server):
    with slow_server(max_streams=2) as srv:
        app, runner = srv.app, runner_of(srv)
        async def main():
            a = await _open(srv.ws_url)
            b = await _open(srv.ws_url)
            assert runner.stats()["streams"] == 2
            # Over the limit: told why in-band, then closed with 1013 "try again later".
            c = await websockets.connect(srv.ws_url)
            err = await recv_json(c)
            assert err["code"] == "overloaded"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd.code == 1013
            # Leave with a frame queued: the engine forgets the stream and the permit comes back.
            await a.send(frame_message(jpeg(_image(5, 64)), 1))
            await a.close()
            assert await asyncio.to_thread(_wait_for, lambda: runner.stats()["streams"] == 1)
            d = await _open(srv.ws_url)
            await d.close()
            await b.close()

        asyncio.run(main())
        assert _wait_for(lambda: runner.stats()["streams"] == 0)
        assert _wait_for(lambda: _metric(srv.url, "ditstream_streams_active") == 0)
        assert _metric(srv.url, 'ditstream_rejected_total{reason="streams"}') == 1
        assert app.state.ditstream.admission.streams.in_use == 0


# Engine-only: it breaks the in-process engine thread (a simulated CUDA fault in ``runner.core``).
# A gateway has no engine thread to kill; a worker's failures reach it as in-band errors and dead
# workers (tests/test_redis_faults.py, tests/test_redis_scale.py::test_no_worker_means_not_ready_and_503).
def test_engine_death_is_loud():
    runner = null_runner()
    app = create_app(Settings(model="null", default_width=64, default_height=64), runner)
    with ServerThread(app) as srv:
        async def main():
            ws = await _open(srv.ws_url)
            await _lockstep(ws, jpeg(_image(6, 64)), range(2))

            def boom() -> None:  # only an unrecoverable device error ends the engine; others fail one tick
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated GPU fault)")

            runner.core._denoise_all = boom  # the next tick kills the engine thread
            await ws.send(frame_message(jpeg(_image(6, 64)), 3))
            err = await recv_json(ws)
            assert err["code"] == "engine_dead" and "simulated GPU fault" in err["message"]
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1011
            # New streams are refused the same way; readiness says so.
            ws2 = await websockets.connect(srv.ws_url)
            assert (await recv_json(ws2))["code"] == "engine_dead"

        asyncio.run(main())
        r = httpx.get(srv.url + "/ready")
        assert r.status_code == 503 and "simulated GPU fault" in r.json()["error"]
        assert httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x"}).status_code == 503
        assert httpx.get(srv.url + "/health").status_code == 503  # liveness too: restart me


def test_similarity_filter_switched_on_live(null_server):
    async def main():
        ws = await _open(null_server.ws_url)
        data = jpeg(_image(8, 64))
        before = await _lockstep(ws, data, range(4))
        assert not any(h["skipped"] for h, _ in before)  # off by default
        await ws.send(json.dumps({"type": "config", "filter": {"enabled": True, "threshold": 0.5, "max_skip": 3,
                                                               "seed": 0}}))
        after = await _lockstep(ws, data, range(4, 20))
        flags = [h["skipped"] for h, _ in after]
        assert sum(flags) >= 8, flags  # a static input is mostly skipped...
        runs = "".join("s" if f else "." for f in flags).split(".")
        assert max(len(r) for r in runs) <= 3, flags  # ...but never more than max_skip in a row
        assert all(_diff(out, _image(8, 64)) < 8 for _, out in after)  # a skip re-sends the last output
        await ws.close()

    asyncio.run(main())


def test_frames_waiting_for_the_decoder_are_kept_as_deep_as_the_engine_inbox(monkeypatch):
    """Three frames in flight while the decoder is busy with the first: the two behind it wait (as
    deep as the engine's inbox) and all three are handed to the engine; only a fourth would drop the
    oldest waiting one. In-process engine only: through the gateway frames are relayed, not decoded."""
    import threading

    from ditstream.server import codec
    from ditstream.server.live import ws_intake

    entered, release = threading.Event(), threading.Event()
    real_decode = codec.decode

    def held_decode(*a, **kw):
        if not entered.is_set():
            entered.set()
            release.wait(30)
        return real_decode(*a, **kw)

    monkeypatch.setattr(codec, "decode", held_decode)
    app = create_app(Settings(model="null", default_width=64, default_height=64), null_runner())
    with ServerThread(app) as srv:
        async def main() -> list[int]:
            ws = await _open(srv.ws_url)
            data = jpeg(_image(8, 64))
            for seq in range(3):
                await ws.send(frame_message(data, seq))
            (session,) = app.state.ditstream.sessions
            deadline = time.monotonic() + 30
            while not (entered.is_set() and len(session.intake._queue) == 2):
                assert time.monotonic() < deadline, "frames 1 and 2 never queued behind the held decode"
                await asyncio.sleep(0.01)
            assert len(session.intake._queue) == ws_intake.DECODE_DEPTH
            real_submit = session.handle.submit

            def submit(image, seq, ts):  # what the decode step hands the engine
                offered.append(seq)
                return real_submit(image, seq, ts)

            session.handle.submit = submit
            release.set()
            seqs: list[int] = []
            while not seqs or seqs[-1] != 2:
                seqs.append((await recv_frame(ws))[0]["seq"])
            await ws.close()
            return seqs

        offered: list[int] = []
        seqs = asyncio.run(main())
        # The decode step dropped nothing; what comes back is the engine inbox's call (two deep:
        # offered all at once, the oldest may give way), in order and ending with the newest.
        assert offered == [0, 1, 2], offered
        assert seqs in ([0, 1, 2], [0, 2], [1, 2]), seqs
