"""Scale-out acceptance on loopback: a real ``redis-server``, 2 worker processes, 1 gateway.

Workers run the null (echo) engine with a simulated inference delay, so every answer can be checked
against its own input (an img2img echo) and cross-talk would show. The worker processes are real
(``python -m ditstream worker``): the kill test sends a true SIGKILL. Tests run in file order and
share one cluster; each starts by making sure two workers are alive.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import websockets
from ditstream.server.api.app import create_app
from ditstream.server.scale.gateway import RedisGatewayRunner
from ditstream.server.scale.messages import JobResult, Keys, SessionRecord
from ditstream.server.settings import Settings
from PIL import Image
from testkit import frame_message, jpeg, recv_frame, recv_json

from ditstream.bench.harness import ServerThread
from ditstream.bench.scale_harness import RedisServer, WorkerProcess, redis_server_binary, wait_for

pytestmark = pytest.mark.timeout(300)

if redis_server_binary() is None:  # the CI installs it; say so rather than pass silently
    pytest.fail("redis-server is required for the scale-out tests (apt-get install -y redis-server)",
                pytrace=False)

SIZE = 64
JOB_TIMEOUT_S = 30.0
HEARTBEAT_S, TTL_S, CLAIM_IDLE_S = 0.4, 2.0, 2.0


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(log_dir=tmp).start()
        self.settings = Settings(redis_url=self.redis.url, model="null", default_width=SIZE, default_height=SIZE,
                                 job_timeout_s=JOB_TIMEOUT_S, max_queued_jobs=64, max_streams=8,
                                 worker_heartbeat_s=HEARTBEAT_S, worker_ttl_s=TTL_S, job_claim_idle_s=CLAIM_IDLE_S)
        self.gateway = RedisGatewayRunner.from_settings(self.settings)
        self.server = ServerThread(create_app(self.settings, self.gateway)).__enter__()
        self.workers: dict[str, WorkerProcess] = {}
        self.r = redis.Redis.from_url(self.redis.url)
        self.n = 0

    def start_worker(self, delay_ms: float = 150.0) -> WorkerProcess:
        self.n += 1
        wid = f"w{self.n}"
        w = WorkerProcess(self.redis.url, "--model", "null", "--null-delay-ms", str(delay_ms), "--max-jobs", "2",
                          "--heartbeat-s", str(HEARTBEAT_S), "--ttl-s", str(TTL_S), "--claim-idle-s",
                          str(CLAIM_IDLE_S), "--threads", "1", worker_id=wid, log=self.tmp / f"{wid}.log").start()
        self.workers[wid] = w
        return w

    def ensure_workers(self, n: int = 2) -> list[str]:
        live = [wid for wid, w in self.workers.items() if w.running]
        while len(live) < n:
            live.append(self.start_worker().worker_id)
        try:
            wait_for(lambda: set(live) <= set(self.gateway.workers), 120, what=f"workers {live} beating")
            wait_for(lambda: httpx.get(self.url + "/ready").status_code == 200, 30, what="/ready 200")
        except TimeoutError:
            raise AssertionError("workers did not come up:\n" + "\n".join(
                w.log_tail(2000) for w in self.workers.values())) from None
        return live

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.__exit__(None, None, None)
        for w in self.workers.values():
            w.stop()
        self.r.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("scale"))
    try:
        yield c
    finally:
        c.close()


# ------------------------------------------------------------------------------------ helpers
def _color(i: int) -> np.ndarray:
    """A solid colour unique per index (distinct after JPEG round trips)."""
    rgb = ((i * 53) % 200 + 30, (i * 97) % 200 + 30, (i * 151) % 200 + 30)
    return np.full((SIZE, SIZE, 3), rgb, dtype=np.uint8)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _b64_image(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


async def _edit(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, float, np.ndarray | None]:
    """One img2img job of colour ``i``: (status, seconds, output image)."""
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/images/edits", data={"prompt": f"job {i}", "seed": str(i)},
                          files={"image": ("in.png", _png(_color(i)), "image/png")})
    dt = time.perf_counter() - t0
    return r.status_code, dt, (_b64_image(r.json()) if r.status_code == 200 else None)


async def _jobs(url: str, ids: range) -> list[tuple[int, float, np.ndarray | None]]:
    async with httpx.AsyncClient(timeout=JOB_TIMEOUT_S + 30) as client:
        return await asyncio.gather(*[_edit(client, url, i) for i in ids])


def _check_jobs(results: list[tuple[int, float, np.ndarray | None]], ids: range) -> None:
    for i, (status, dt, img) in zip(ids, results):
        assert status == 200, f"job {i}: HTTP {status}"
        assert dt < JOB_TIMEOUT_S, f"job {i} took {dt:.1f} s, past its {JOB_TIMEOUT_S} s deadline"
        assert img is not None and np.array_equal(img, _color(i)), f"job {i} got another job's image"


class StreamClient:
    """A lock-step WebSocket stream of one colour; re-sends when an answer does not come (re-pin)."""

    def __init__(self, url: str, color: int) -> None:
        self.url, self.color = url, color
        self.session = ""
        self.outputs: list[tuple[float, int, float]] = []  # (time, seq, colour error)
        self.seq = 0
        self.ws: websockets.ClientConnection | None = None

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None)
        ready = await recv_json(self.ws)
        assert ready["type"] == "ready", ready
        self.session = ready["session"]

    async def run(self, until: asyncio.Event, answer_timeout: float = 2.0) -> None:
        assert self.ws is not None
        data = jpeg(_color(self.color))
        want = _color(self.color).astype(float)
        while not until.is_set():
            self.seq += 1
            await self.ws.send(frame_message(data, self.seq))
            try:
                while True:
                    header, img = await recv_frame(self.ws, timeout=answer_timeout)
                    self.outputs.append((time.monotonic(), header["seq"], float(np.abs(img - want).mean())))
                    if header["seq"] == self.seq:
                        break
            except TimeoutError:
                continue  # frame lost with its worker: send the next one

    def check(self, since: float = 0.0) -> list[tuple[float, int, float]]:
        outs = [o for o in self.outputs if o[0] >= since]
        seqs = [s for _, s, _ in self.outputs]
        assert seqs == sorted(seqs), f"stream {self.color}: outputs out of order {seqs}"
        assert len(set(seqs)) == len(seqs), f"stream {self.color}: a frame arrived twice {seqs}"
        for _, seq, err in outs:
            assert err < 8.0, f"stream {self.color}: frame {seq} is not this stream's image (error {err:.1f})"
        return outs

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


def _answers_since(c: Cluster, before: dict[str, str]) -> list[JobResult]:
    """Jobs the gateway got an answer for since ``before`` (a copy of its job -> worker memory); the
    reply stream itself is empty once read, and a second answer would show in ``duplicate_answers``."""
    return [JobResult(job=j, worker=w) for j, w in list(c.gateway.jobs.answered_by().items()) if j not in before]


def _moves(c: Cluster) -> int:
    return c.gateway.counters["sessions_repinned"] + c.gateway.counters["sessions_rebalanced"]


def _record(c: Cluster, sid: str) -> SessionRecord:
    raw = c.r.get(Keys(c.settings.redis_prefix).session(sid))
    assert raw is not None, f"no record for session {sid}"
    return SessionRecord.load(raw)


# ------------------------------------------------------------------------------------ tests
def test_two_workers_serve_50_jobs_and_4_streams(cluster: Cluster):
    live = cluster.ensure_workers(2)
    ready = httpx.get(cluster.url + "/ready").json()
    assert ready["status"] == "ready" and ready["redis"] is True and ready["workers"] == 2
    before = cluster.gateway.jobs.answered_by()

    async def main():
        streams = [StreamClient(cluster.server.ws_url, 100 + k) for k in range(4)]
        for s in streams:
            await s.open()
        stop = asyncio.Event()
        runners = [asyncio.create_task(s.run(stop, answer_timeout=10.0)) for s in streams]
        results = await _jobs(cluster.url, range(50))
        deadline = time.monotonic() + 120
        while min(len(s.outputs) for s in streams) < 8:
            if time.monotonic() > deadline:  # say which stream stalled and why, instead of hanging
                raise AssertionError(f"streams stalled: outputs {[len(s.outputs) for s in streams]}, runners "
                                     f"{[r.exception() if r.done() else 'running' for r in runners]}, "
                                     f"sessions {[s.session for s in streams]}")
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*runners)
        for s in streams:
            await s.close()
        return streams, results

    streams, results = asyncio.run(main())
    _check_jobs(results, range(50))
    for s in streams:
        assert len(s.check()) >= 8
    answers = _answers_since(cluster, before)
    assert len(answers) == 50 and len({a.job for a in answers}) == 50, "each job answered exactly once"
    assert cluster.gateway.counters["duplicate_answers"] == 0
    replies = cluster.gateway.replies
    assert cluster.r.xlen(replies) == 0, "every reply is deleted once read"
    by_worker = {w: sum(a.worker == w for a in answers) for w in live}
    assert all(n > 0 for n in by_worker.values()), f"both workers took jobs: {by_worker}"
    metrics = httpx.get(cluster.url + "/metrics").text
    assert "ditstream_workers_up 2.0" in metrics
    for wid in live:
        assert f'ditstream_worker_up{{worker="{wid}"}} 1.0' in metrics
        assert f'ditstream_worker_jobs_total{{outcome="done",worker="{wid}"}}' in metrics


def test_sigkill_mid_job_jobs_finish_once_and_streams_move(cluster: Cluster):
    live = cluster.ensure_workers(2)
    before = cluster.gateway.jobs.answered_by()
    jobs_key = Keys(cluster.settings.redis_prefix).jobs

    async def main():
        streams = [StreamClient(cluster.server.ws_url, 200 + k) for k in range(4)]
        for s in streams:
            await s.open()
        pins = {s.session: _record(cluster, s.session).worker for s in streams}
        stop = asyncio.Event()
        runners = [asyncio.create_task(s.run(stop)) for s in streams]
        while min(len(s.outputs) for s in streams) < 2:
            await asyncio.sleep(0.05)
        jobs = asyncio.create_task(_jobs(cluster.url, range(1000, 1030)))
        # Kill a worker that holds both streams and unfinished jobs, while it holds them.
        victim = None
        for _ in range(400):
            # Where the streams are now (a session may have been rebalanced since it opened).
            pins = {s.session: _record(cluster, s.session).worker for s in streams}
            pending = cluster.r.xpending(jobs_key, "workers")
            held = {c["name"].decode(): c["pending"] for c in pending.get("consumers", [])}
            candidates = [w for w in live if held.get(w, 0) > 0 and w in pins.values()]
            if candidates:
                victim = candidates[0]
                break
            await asyncio.sleep(0.01)
        assert victim is not None, "no worker ever held a job"
        moves_before = _moves(cluster)
        cluster.workers[victim].kill()
        killed_at = time.monotonic()
        results = await jobs
        moved = [s for s in streams if pins[s.session] == victim]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                len([o for o in s.outputs if o[0] > killed_at]) >= 3 for s in streams):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*runners)
        after = {s.session: _record(cluster, s.session).worker for s in streams}
        for s in streams:
            await s.close()
        return victim, killed_at, moved, streams, results, after, moves_before

    victim, killed_at, moved, streams, results, after, moves_before = asyncio.run(main())
    _check_jobs(results, range(1000, 1030))
    answers = _answers_since(cluster, before)
    assert len(answers) == 30 and len({a.job for a in answers}) == 30, "every job answered, none twice"
    assert cluster.gateway.counters["duplicate_answers"] == 0
    survivor = next(w for w in live if w != victim)
    assert any(a.worker == survivor for a in answers)
    assert moved, "the victim had streams"
    for s in streams:
        assert len(s.check(since=killed_at)) >= 3, f"stream {s.session} did not resume"
        assert after[s.session] == survivor, f"stream {s.session} is pinned to {after[s.session]}"
    # Each moved either when the gateway saw the victim dead, or earlier by rebalancing (the victim
    # held more sessions than the survivor, and its death was not noticed yet).
    assert _moves(cluster) - moves_before >= len(moved)
    assert not cluster.workers[victim].running


def test_redis_restart_gateway_and_workers_reconnect(cluster: Cluster):
    cluster.ensure_workers(2)

    async def main():
        s = StreamClient(cluster.server.ws_url, 300)
        await s.open()
        stop = asyncio.Event()
        task = asyncio.create_task(s.run(stop))
        while len(s.outputs) < 2:
            await asyncio.sleep(0.05)
        cluster.redis.stop()
        down_at = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: httpx.get(cluster.url + "/ready").status_code == 503, 10,
                                what="/ready 503 while Redis is down")
        body = httpx.get(cluster.url + "/ready").json()
        assert body["redis"] is False
        await asyncio.sleep(1.0)
        cluster.redis.start()  # on this thread: the child dies with the thread that started it (PDEATHSIG)
        await asyncio.to_thread(wait_for, lambda: httpx.get(cluster.url + "/ready").status_code == 200, 30,
                                what="/ready 200 after Redis came back")
        results = await _jobs(cluster.url, range(2000, 2010))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len([o for o in s.outputs if o[0] > down_at]) < 3:
            await asyncio.sleep(0.1)
        fresh = StreamClient(cluster.server.ws_url, 301)
        await fresh.open()
        stop2 = asyncio.Event()
        t2 = asyncio.create_task(fresh.run(stop2, answer_timeout=10.0))
        while len(fresh.outputs) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        stop2.set()
        await asyncio.gather(task, t2)
        await s.close()
        await fresh.close()
        return s, fresh, down_at, results

    s, fresh, down_at, results = asyncio.run(main())
    _check_jobs(results, range(2000, 2010))
    assert len(s.check(since=down_at)) >= 3, "the stream open across the restart resumed"
    assert len(fresh.check()) >= 3
    assert httpx.get(cluster.url + "/ready").json()["workers"] == 2


def test_no_worker_means_not_ready_and_503(cluster: Cluster):
    for w in cluster.workers.values():
        w.stop()
    wait_for(lambda: httpx.get(cluster.url + "/ready").status_code == 503, 20, what="/ready 503 without workers")
    body = httpx.get(cluster.url + "/ready").json()
    assert body["workers"] == 0 and body["redis"] is True
    r = httpx.post(cluster.url + "/v1/images/generations", json={"prompt": "x", "size": f"{SIZE}x{SIZE}"})
    assert r.status_code == 503
    assert json.loads(r.text)["error"]["code"] == "engine_dead"


def test_bench_scale_two_workers_double_throughput(tmp_path: Path):
    """``ditstream bench scale`` on the null engine: the transport adds no serialisation point.

    The simulated inference is a sleep, so the figure does not depend on free CPU cores: it checks
    that two workers really share the load (fair claiming, no gateway bottleneck). The real-model
    figure from the same command is recorded in docs/benchmarks.md.
    """
    from ditstream.bench.scale import ScaleBenchSpec, format_report, run_scale_bench

    spec = ScaleBenchSpec(model="null", workers=2, jobs=40, concurrency=8, size=f"{SIZE}x{SIZE}", max_jobs=2,
                          null_delay_ms=100.0, warmup_per_worker=2, start_timeout_s=120)
    results = run_scale_bench(spec, log_dir=tmp_path)
    report = format_report(spec, results)
    for run in results["runs"].values():
        assert run["errors"] == 0 and run["images"] == spec.jobs, report
    assert results["speedup"] >= 1.6, report
