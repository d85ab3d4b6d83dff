"""Issue 17 over a real ``redis-server``, worker and gateway in-process (null engines):

- exactly once, in order: a session moved while its old worker is still alive never hands the
  client a frame twice, out of order or from another session;
- nobody computes for the dead: a job whose gateway is gone is dropped unrun;
- bounded Redis: replies are deleted once read.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import numpy as np
import pytest
import redis
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.gateway import RedisGatewayRunner
from ditstream.server.scale.worker import Worker

from ditstream.bench.scale_harness import wait_for

pytestmark = pytest.mark.timeout(120)


SIZE = 64



@pytest.fixture
def scfg(redis_url: str) -> ScaleConfig:
    # Slow janitor checks (drop_foreign_sessions every 2 beats = 4 s): only the frame epoch can stop
    # the old worker in time.
    return ScaleConfig(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", heartbeat_s=2.0, worker_ttl_s=10.0,
                       claim_idle_s=5.0, max_jobs=2, supervise_s=0.1)


@pytest.fixture
def r(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _null_worker(scfg: ScaleConfig, wid: str, delay_s: float = 0.02) -> Worker:
    from ditstream.engine.null import null_runner

    return Worker(null_runner(EngineConfig(), delay_s=delay_s), scfg, worker_id=wid)


def _shade(seq: int) -> int:
    return 20 + (seq * 7) % 200


def test_a_session_moved_while_its_worker_lives_never_repeats_or_reorders_a_frame(scfg: ScaleConfig):
    workers = {wid: _null_worker(scfg, wid).start() for wid in ("wa", "wb")}
    gw = RedisGatewayRunner(scfg, EngineConfig(output_queue_size=64), job_timeout_s=30).start()
    got: list[tuple[int, int]] = []  # (seq, shade error)
    stop = threading.Event()
    try:
        wait_for(lambda: len(gw.workers) == 2, 20, what="gateway sees both workers")
        h = gw.add_stream(StreamConfig(prompt="p", width=SIZE, height=SIZE), notify=None)

        def feed() -> None:  # free-running: several frames in flight at every moment
            seq = 0
            while not stop.is_set():
                h.submit(np.full((SIZE, SIZE, 3), _shade(seq), np.uint8), seq, float(seq))
                seq += 1
                time.sleep(0.005)

        def drain() -> None:
            while not stop.is_set():
                out = h.outputs.get(timeout=0.2)
                if out is not None:
                    got.append((out.seq, int(np.abs(out.image.astype(int) - _shade(out.seq)).max())))

        threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
        for t in threads:
            t.start()
        for _move in range(4):  # force a re-pin while the old worker is alive and busy with the session
            wait_for(lambda n=len(got): len(got) >= n + 10, 20, what="outputs flowing")
            old = h.worker
            h.pinning = True  # as the supervisor would see it: a move in progress
            try:
                assert gw.sessions.pin(h, exclude={old})
                gw.sessions.resend_unanswered(h)
            finally:
                h.pinning = False
            assert h.worker != old
            # The old worker stops answering at the new epoch's first frame, long before its janitor.
            wait_for(lambda o=old: not workers[o].sessions.has(h.id), 2.0, interval=0.02,
                     what=f"old worker {old} dropped the moved session")
        wait_for(lambda n=len(got): len(got) >= n + 10, 20, what="outputs flowing after the last move")
        stop.set()
        for t in threads:
            t.join(5)
        seqs = [s for s, _ in got]
        assert len(seqs) > 40
        assert len(set(seqs)) == len(seqs), f"a frame reached the client twice: {seqs}"
        assert seqs == sorted(seqs), f"frames out of order: {seqs}"
        assert all(err <= 4 for _, err in got), "an output is not the image of its own frame"
        assert sum(w.counters["sessions_opened"] for w in workers.values()) == 5
        h.close()
    finally:
        stop.set()
        gw.stop()
        for w in workers.values():
            w.stop()


# ------------------------------------------------------------------------------------ nobody computes for the dead
def _fake_heartbeat(r: redis.Redis, scfg: ScaleConfig, wid: str = "ghost") -> None:
    from ditstream.server.scale.messages import Heartbeat

    r.set(scfg.keys.worker(wid), Heartbeat(worker=wid, info={"size_multiple": 8}).dump(), px=60_000)
    r.sadd(scfg.keys.workers, wid)


def test_jobs_of_a_dead_gateway_are_dropped_unrun(scfg: ScaleConfig, r: redis.Redis):
    import dataclasses

    scfg = dataclasses.replace(scfg, gateway_ttl_s=1.0, heartbeat_s=0.2)
    _fake_heartbeat(r, scfg)  # lets the gateway accept jobs while no real worker runs
    gw = RedisGatewayRunner(scfg, job_timeout_s=60).start()
    wait_for(lambda: gw.alive, 5, what="gateway alive")
    for seed in range(5):
        gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=SIZE, height=SIZE, seed=seed))
    wait_for(lambda: r.xlen(scfg.keys.jobs) == 5, 5, what="jobs queued")
    assert r.exists(scfg.keys.gateway(gw.id))
    gw._stop.set()  # the gateway dies (as by SIGKILL: no clean-up, its liveness key just expires)
    gw.outbox.wake()
    for t in gw._threads:
        t.join(5)
    wait_for(lambda: not r.exists(scfg.keys.gateway(gw.id)), 5, what="the dead gateway's key expired")
    w = _null_worker(scfg, "w1").start()
    try:
        wait_for(lambda: w.counters["jobs_orphaned"] == 5, 10, what="orphaned jobs dropped")
        assert w.counters["jobs_done"] == 0 and r.xlen(scfg.keys.jobs) == 0
        assert not r.exists(scfg.keys.replies(gw.id)), "nothing answered for nobody"
    finally:
        w.stop()


def test_a_held_job_whose_gateway_died_is_cancelled(scfg: ScaleConfig, r: redis.Redis):
    import dataclasses

    scfg = dataclasses.replace(scfg, gateway_ttl_s=0.6, heartbeat_s=0.2, max_jobs=4)
    w = _null_worker(scfg, "w1", delay_s=0.0)
    gate = threading.Event()
    denoise = w.runner.core._denoise_all  # the engine blocks on its first tick until the gateway is dead

    def blocked_denoise() -> None:
        gate.wait(10)
        denoise()

    w.runner.core._denoise_all = blocked_denoise
    w.start()
    gw = RedisGatewayRunner(scfg, job_timeout_s=60).start()
    try:
        wait_for(lambda: gw.alive, 10, what="gateway alive")
        for seed in range(3):
            gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=SIZE, height=SIZE, seed=seed))
        wait_for(lambda: w.jobs.held() == 3, 10, what="worker holds the jobs")
        gw._stop.set()
        gw.outbox.wake()
        for t in gw._threads:
            t.join(5)
        wait_for(lambda: w.counters["jobs_orphaned"] == 3, 10, what="held jobs cancelled")
        gate.set()
        wait_for(lambda: not w.jobs.held() and r.xlen(scfg.keys.jobs) == 0, 10, what="entries acknowledged")
        assert w.counters["jobs_done"] == 0 and not r.exists(scfg.keys.replies(gw.id))
    finally:
        gate.set()
        w.stop()


def test_the_gateway_process_does_not_import_torch(redis_url: str):
    """A gateway holds no model: building and serving its app (lifespan, /health) imports no torch."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys, httpx
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from ditstream.bench.harness import ServerThread
with ServerThread(create_app(Settings(redis_url={redis_url!r}, redis_prefix="noimport"))) as srv:
    health = httpx.get(srv.url + "/health").status_code
    mode = srv.app.state.ditstream.runner.info["mode"]
print(json.dumps({{"torch": "torch" in sys.modules, "health": health, "mode": mode}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"torch": False, "health": 200, "mode": "gateway"}, got


# ------------------------------------------------------------------------------------ bounded Redis
def test_replies_are_deleted_once_read_and_a_dead_gateways_keys_expire(scfg: ScaleConfig, r: redis.Redis):
    import dataclasses

    scfg = dataclasses.replace(scfg, heartbeat_s=0.2, max_jobs=4, replies_ttl_s=1, gateway_ttl_s=1.0)
    w = _null_worker(scfg, "w1", delay_s=0.0).start()
    gw = RedisGatewayRunner(scfg, job_timeout_s=60).start()
    try:
        wait_for(lambda: gw.alive, 10, what="gateway alive")
        side = 256  # a raw 256² result is 196 KB: 30 kept would be ~6 MB
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(30)]
        futs = [gw.submit_job(StreamConfig(prompt="p", width=side, height=side, seed=i), img)
                for i, img in enumerate(imgs)]
        for img, f in zip(imgs, futs):
            assert np.array_equal(f.result(30).image, img)
        wait_for(lambda: r.xlen(gw.replies) == 0, 5, what="replies deleted once read")
        usage = r.memory_usage(gw.replies) or 0
        assert usage < 16_384, f"the empty reply stream still holds {usage} bytes"
        assert 0 < r.pttl(gw.replies) <= 1000, "a reply stream nobody writes to expires"
        assert r.xlen(scfg.keys.jobs) == 0
        gw._stop.set()  # the gateway dies without cleaning up
        gw.outbox.wake()
        for t in gw._threads:
            t.join(5)
        wait_for(lambda: not r.exists(gw.replies, scfg.keys.gateway(gw.id)), 5,
                 what="the dead gateway's keys expired")
    finally:
        gw.stop()
        w.stop()


# ------------------------------------------------------------------------------------ JPEG passed through
def test_a_stream_frame_costs_two_codec_operations_through_the_gateway(scfg: ScaleConfig, monkeypatch):
    """Client JPEG → gateway (header checked, bytes relayed) → worker decodes → engine → worker encodes
    → gateway relays the worker's JPEG: one decode and one encode per frame, in all."""
    import asyncio

    import simplejpeg
    import websockets
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings
    from testkit import decode_output, frame_message, jpeg

    from ditstream.bench.harness import ServerThread

    settings = Settings(redis_url=scfg.redis_url, redis_prefix=scfg.prefix, model="null", default_width=SIZE,
                        default_height=SIZE, worker_heartbeat_s=scfg.heartbeat_s, worker_ttl_s=scfg.worker_ttl_s)
    w = _null_worker(scfg, "w1", delay_s=0.0).start()
    gw = RedisGatewayRunner.from_settings(settings)
    n = 8
    frames = [jpeg(np.full((SIZE, SIZE, 3), _shade(i), np.uint8)) for i in range(n)]
    calls = {"encode": 0, "decode": 0}
    lock = threading.Lock()

    def counted(name: str, fn):
        def wrapper(*a, **kw):
            with lock:
                calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    try:
        with ServerThread(create_app(settings, gw)) as srv:
            wait_for(lambda: gw.alive, 10, what="gateway sees the worker")

            async def main() -> list[bytes]:
                async with websockets.connect(srv.ws_url, max_size=None) as ws:
                    await asyncio.wait_for(ws.recv(), 30)  # ready
                    monkeypatch.setattr(simplejpeg, "encode_jpeg", counted("encode", simplejpeg.encode_jpeg))
                    monkeypatch.setattr(simplejpeg, "decode_jpeg", counted("decode", simplejpeg.decode_jpeg))
                    got = []
                    for i, data in enumerate(frames):
                        await ws.send(frame_message(data, i))
                        while True:
                            msg = await asyncio.wait_for(ws.recv(), 30)
                            if isinstance(msg, bytes):
                                got.append(msg)
                                break
                    monkeypatch.undo()
                    return got

            outs = asyncio.run(main())
        assert calls == {"encode": n, "decode": n}, f"codec operations for {n} frames: {calls}"
        for i, msg in enumerate(outs):
            header, img = decode_output(msg)
            assert header["seq"] == i and (header["width"], header["height"]) == (SIZE, SIZE)
            assert np.abs(img.astype(int) - _shade(i)).max() <= 4
    finally:
        gw.stop()
        w.stop()


# ------------------------------------------------------------------------------------ rebalancing
class _Feed:
    """One session fed free-running in a thread, its outputs drained in another: (seq, shade error)."""

    def __init__(self, h) -> None:
        self.h, self.got, self.stop = h, [], threading.Event()
        self.threads = [threading.Thread(target=self._feed), threading.Thread(target=self._drain)]
        for t in self.threads:
            t.start()

    def _feed(self) -> None:
        seq = 0
        while not self.stop.is_set():
            self.h.submit(np.full((SIZE, SIZE, 3), _shade(seq), np.uint8), seq, float(seq))
            seq += 1
            time.sleep(0.01)  # the client's frame rate, not a synchronisation

    def _drain(self) -> None:
        while not self.stop.is_set():
            out = self.h.outputs.get(timeout=0.2)
            if out is not None:
                self.got.append((out.seq, int(np.abs(out.image.astype(int) - _shade(out.seq)).max())))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


def test_sessions_spread_again_when_a_worker_joins_each_frame_once_in_order(scfg: ScaleConfig):
    """Four sessions on the only worker; a second worker joins: two of them move to it, one at a
    time, and then nothing moves any more. Every stream keeps its frames exactly once, in order."""
    scfg = dataclasses.replace(scfg, heartbeat_s=0.2, worker_ttl_s=1.0, rebalance_s=0.3)
    workers = {"wa": _null_worker(scfg, "wa").start()}
    gw = RedisGatewayRunner(scfg, EngineConfig(output_queue_size=64), job_timeout_s=30).start()
    feeds: list[_Feed] = []
    try:
        wait_for(lambda: len(gw.workers) == 1, 20, what="gateway sees wa")
        handles = [gw.add_stream(StreamConfig(prompt="p", width=SIZE, height=SIZE), notify=None) for _ in range(4)]
        assert {h.worker for h in handles} == {"wa"}
        feeds = [_Feed(h) for h in handles]
        wait_for(lambda: all(len(f.got) >= 5 for f in feeds), 20, what="outputs flowing on wa")
        workers["wb"] = _null_worker(scfg, "wb").start()
        wait_for(lambda: sorted(h.worker for h in handles) == ["wa", "wa", "wb", "wb"], 15, interval=0.05,
                 what="two sessions moved to wb")
        wait_for(lambda: workers["wa"].sessions.count() == 2 and workers["wb"].sessions.count() == 2, 10, interval=0.05,
                 what="each worker holds two sessions")
        # Stable: outputs advance well past several rebalance intervals and nothing else moves.
        marks = [len(f.got) for f in feeds]
        wait_for(lambda: all(len(f.got) >= m + 60 for f, m in zip(feeds, marks, strict=True)), 20,
                 what="outputs flowing after the moves")
        assert gw.counters["sessions_rebalanced"] == 2 and gw.counters["sessions_repinned"] == 0
        for f in feeds:
            f.close()
        for f in feeds:
            seqs = [s for s, _ in f.got]
            assert len(set(seqs)) == len(seqs), f"a frame reached the client twice: {seqs}"
            assert seqs == sorted(seqs), f"frames out of order: {seqs}"
            assert all(err <= 4 for _, err in f.got), "an output is not the image of its own frame"
        for h in handles:
            h.close()
    finally:
        for f in feeds:
            f.close()
        gw.stop()
        for w in workers.values():
            w.stop()


def test_a_session_no_live_worker_will_reopen_is_failed_not_stalled(scfg: ScaleConfig):
    """Its worker leaves and the only other one refuses the stream's config (here: over its pixel
    limit): the gateway cannot re-pin it, so the client's next frame is refused with an overload
    error (WebSocket 1013: reconnect, and the new open names the real reason) instead of frames
    going to a worker that never opened the session."""
    from ditstream.engine.errors import OverloadedError
    from ditstream.engine.null import null_runner

    scfg = dataclasses.replace(scfg, heartbeat_s=0.2, worker_ttl_s=1.0)
    wa = _null_worker(scfg, "wa").start()
    gw = RedisGatewayRunner(scfg, EngineConfig(), job_timeout_s=30).start()
    wb = None
    try:
        wait_for(lambda: set(gw.workers) == {"wa"}, 20, what="gateway sees wa")
        h = gw.add_stream(StreamConfig(prompt="p", width=SIZE, height=SIZE), notify=None)
        frame = np.zeros((SIZE, SIZE, 3), np.uint8)
        h.submit(frame, 0, 0.0)
        assert h.outputs.get(timeout=20) is not None
        wb = Worker(null_runner(EngineConfig(max_pixels=(SIZE // 2) ** 2)), scfg, worker_id="wb").start()
        wait_for(lambda: set(gw.workers) == {"wa", "wb"}, 20, what="gateway sees wb")
        wa.stop(drain_s=0.0)
        wait_for(lambda: h.failed is not None, 10, interval=0.02, what="the re-pin to wb refused")
        with pytest.raises(OverloadedError, match="could not be re-opened on another") as info:
            h.submit(frame, 1, 1.0)
        assert info.value.reason == "no_worker" and "pixel" in info.value.message, info.value.message
        h.close()
    finally:
        gw.stop()
        wa.stop()
        if wb is not None:
            wb.stop()
