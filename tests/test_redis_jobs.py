"""Job and session mechanics over a real ``redis-server``, with the worker and gateway in-process.

Deadlines, dead-lettering, answering once, cancellation, retries, session control and the wire
messages — each on its own key prefix, so tests cannot see each other's keys.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future

import numpy as np
import pytest
import redis
from ditstream.engine.config import EngineConfig, FilterConfig, StreamConfig
from ditstream.engine.errors import GenerationError, OverloadedError, ValidationError
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.gateway import RedisGatewayRunner
from ditstream.server.scale.messages import (
    WIRE_VERSION,
    ErrorInfo,
    Heartbeat,
    JobMessage,
    JobResult,
    Keys,
    WireError,
    config_from_wire,
    config_to_wire,
    decode_image,
    encode_image,
)
from ditstream.server.scale.worker import Worker

from ditstream.bench.scale_harness import RedisServer, wait_for

pytestmark = pytest.mark.timeout(120)




@pytest.fixture
def scfg(redis_url: str) -> ScaleConfig:
    return ScaleConfig(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", heartbeat_s=0.2, worker_ttl_s=1.0,
                       claim_idle_s=0.3, max_attempts=3, max_jobs=2, supervise_s=0.1)


@pytest.fixture
def r(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _null_worker(scfg: ScaleConfig, wid: str = "w1", delay_s: float = 0.01) -> Worker:
    from ditstream.engine.null import null_runner

    return Worker(null_runner(EngineConfig(), delay_s=delay_s), scfg, worker_id=wid)


def _job(keys: Keys, reply_to: str, deadline_in: float = 30.0, **cfg) -> JobMessage:
    c = StreamConfig(mode="txt2img", prompt="p", width=64, height=64, **cfg)
    return JobMessage(reply_to=reply_to, config=config_to_wire(c), deadline=time.time() + deadline_in)


def _results(r: redis.Redis, stream: str) -> list[JobResult]:
    return [JobResult.load(f[b"m"]) for _i, f in r.xrange(stream) if b'"kind":"result"' in f[b"m"]]


# ------------------------------------------------------------------------------------ messages
def test_messages_round_trip_and_refuse_other_versions():
    cfg = StreamConfig(prompt="a cat", seed=7, steps=2, timesteps=(1.5, 0.7),
                       filter=FilterConfig(enabled=True, threshold=0.9))
    assert config_from_wire(config_to_wire(cfg)) == cfg
    msg = JobMessage(reply_to="x", config=config_to_wire(cfg), deadline=1.0)
    back = JobMessage.load(msg.dump())
    assert back.dump() == msg.dump() and config_from_wire(back.config) == cfg
    assert f'"v":{WIRE_VERSION}'.encode() in msg.dump()
    raw = msg.dump().replace(f'"v":{WIRE_VERSION}'.encode(), f'"v":{WIRE_VERSION - 1}'.encode())
    with pytest.raises(WireError, match=f"version {WIRE_VERSION - 1}; this build speaks {WIRE_VERSION}"):
        JobMessage.load(raw)
    with pytest.raises(Exception, match="extra"):
        JobMessage.load(msg.dump()[:-1] + b',"pickle":"no"}')
    img = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    for codec in ("raw", "png"):
        assert np.array_equal(decode_image(*encode_image(img, codec)), img)
    meta, data = encode_image(np.full((16, 24, 3), 90, np.uint8), "jpeg")
    assert np.abs(decode_image(meta, data).astype(int) - 90).max() <= 2
    with pytest.raises(WireError):
        decode_image(meta.model_copy(update={"codec": "raw"}), data)
    err = ErrorInfo.of(ValidationError("bad", field="steps")).to_exception()
    assert isinstance(err, ValidationError) and err.field == "steps"
    assert isinstance(ErrorInfo.of(OverloadedError("full")).to_exception(), OverloadedError)
    assert isinstance(ErrorInfo.of(RuntimeError("boom")).to_exception(), GenerationError)


def test_each_wire_version_has_its_own_keys():
    """A rolling upgrade: old and new builds on one Redis never read each other's streams."""
    new, old = Keys("ditstream"), Keys("ditstream", version=WIRE_VERSION - 1)
    assert new.jobs == f"ditstream:v{WIRE_VERSION}:jobs"
    for name in ("jobs", "dead_letter", "workers"):
        assert getattr(new, name) != getattr(old, name)
    assert new.worker("w1") != old.worker("w1") and new.replies("g") != old.replies("g")
    assert Keys("ditstream:").jobs == new.jobs


# ------------------------------------------------------------------------------------ jobs
def test_job_past_its_deadline_is_dropped_not_run(scfg: ScaleConfig, r: redis.Redis):
    keys = scfg.keys
    r.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    r.xadd(keys.jobs, {"m": _job(keys, "replies", deadline_in=-1).dump()})
    w = _null_worker(scfg).start()
    try:
        wait_for(lambda: w.counters["jobs_expired"] == 1, 10, what="expired job dropped")
        assert w.counters["jobs_done"] == 0
        assert r.xlen(keys.jobs) == 0 and r.xpending(keys.jobs, keys.group)["pending"] == 0
        assert _results(r, "replies") == []
    finally:
        w.stop()


def test_job_delivered_too_often_goes_to_the_dead_letter_stream(scfg: ScaleConfig, r: redis.Redis):
    keys = scfg.keys
    reply = f"{scfg.prefix}:replies:test"
    r.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    job = _job(keys, reply)
    eid = r.xadd(keys.jobs, {"m": job.dump()})
    # A consumer that "crashed" on it scfg.max_attempts times already.
    r.xreadgroup(keys.group, "ghost", {keys.jobs: ">"}, count=1)
    r.xclaim(keys.jobs, keys.group, "ghost", 0, [eid], idle=60_000, retrycount=scfg.max_attempts)
    w = _null_worker(scfg).start()
    try:
        wait_for(lambda: r.xlen(keys.dead_letter) == 1, 10, what="dead-lettered job")
        (_id, fields), = r.xrange(keys.dead_letter)
        assert JobMessage.load(fields[b"m"]).job == job.job
        assert b"delivered" in fields[b"reason"]
        wait_for(lambda: _results(r, reply), 10, what="error answer")
        (res,) = _results(r, reply)
        assert res.error is not None and res.error.code == "generation_error"
        assert r.xpending(keys.jobs, keys.group)["pending"] == 0
        assert w.counters["jobs_done"] == 0 and w.counters["jobs_dead_lettered"] == 1
    finally:
        w.stop()


def test_failing_job_is_retried_then_dead_lettered(scfg: ScaleConfig, r: redis.Redis):
    keys = scfg.keys
    reply = f"{scfg.prefix}:replies:test"
    w = _null_worker(scfg)

    def failing(_cfg, _image=None) -> Future:
        f: Future = Future()
        f.set_exception(GenerationError("out of memory"))
        return f

    w.runner.submit_job = failing  # type: ignore[method-assign]
    w.start()
    try:
        r.xadd(keys.jobs, {"m": _job(keys, reply).dump()})
        wait_for(lambda: _results(r, reply), 10, what="final error answer")
        (res,) = _results(r, reply)
        assert res.error is not None and res.error.code == "generation_error"
        assert w.counters["jobs_retried"] == scfg.max_attempts - 1
        assert r.xlen(keys.dead_letter) == 1
        assert r.xlen(keys.jobs) == 0
    finally:
        w.stop()


def test_a_job_is_answered_once_even_if_two_workers_finish_it(scfg: ScaleConfig, r: redis.Redis):
    from ditstream.engine.types import StreamOutput

    keys = scfg.keys
    reply = f"{scfg.prefix}:replies:test"
    job = _job(keys, reply)
    out = StreamOutput(stream_id="j", seq=0, ts=0.0, image=np.zeros((8, 8, 3), np.uint8))
    a, b = _null_worker(scfg, "a"), _null_worker(scfg, "b")
    assert a.answers.reply("", job, out, None) is True
    assert b.answers.reply("", job, out, None) is False
    (res,) = _results(r, reply)
    assert res.worker == "a" and b.counters["jobs_duplicate"] == 1


def _fake_heartbeat(r: redis.Redis, keys: Keys, wid: str = "ghost") -> None:
    r.set(keys.worker(wid), Heartbeat(worker=wid, info={"size_multiple": 8}).dump(), px=60_000)
    r.sadd(keys.workers, wid)


def test_cancelled_job_is_marked_and_never_run(scfg: ScaleConfig, r: redis.Redis):
    keys = scfg.keys
    _fake_heartbeat(r, keys)  # lets the gateway accept the job while no real worker runs
    gw = RedisGatewayRunner(scfg, job_timeout_s=30).start()
    try:
        wait_for(lambda: gw.alive, 5, what="gateway alive")
        fut = gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=64, height=64))
        wait_for(lambda: r.xlen(keys.jobs) == 1, 5, what="job queued")
        assert fut.cancel()
        job = JobMessage.load(r.xrange(keys.jobs)[0][1][b"m"])
        wait_for(lambda: r.exists(keys.done(job.job)), 5, what="cancel mark")
        w = _null_worker(scfg).start()
        try:
            wait_for(lambda: w.counters["jobs_duplicate"] == 1, 10, what="worker skipped the cancelled job")
            assert w.counters["jobs_done"] == 0 and r.xlen(keys.jobs) == 0
        finally:
            w.stop()
    finally:
        gw.stop()


def test_gateway_job_and_session_round_trip_through_a_worker(scfg: ScaleConfig, r: redis.Redis):
    w = _null_worker(scfg).start()
    gw = RedisGatewayRunner(scfg, EngineConfig(output_queue_size=4), job_timeout_s=30).start()
    try:
        wait_for(lambda: gw.alive and gw.info.get("model") == "null", 10, what="gateway sees the worker")
        img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        out = gw.submit_job(StreamConfig(prompt="p", width=64, height=64, seed=3), img).result(20)
        assert np.array_equal(out.image, img), "jobs travel losslessly"
        with pytest.raises(ValidationError):
            gw.submit_job(StreamConfig(prompt="p", width=60, height=64))  # not a multiple of 8
        handle = gw.add_stream(StreamConfig(prompt="p", width=64, height=64), notify=None)
        assert r.get(scfg.keys.session(handle.id)) is not None
        with pytest.raises(ValidationError):
            handle.reconfigure(steps=9)
        applied = handle.reconfigure(prompt="a new prompt").result(10)
        assert applied.prompt == "a new prompt" and handle.config.prompt == "a new prompt"
        frame = np.full((64, 64, 3), 77, np.uint8)
        for seq in range(3):
            handle.submit(frame, seq, float(seq))
            got = handle.outputs.get(timeout=10)
            assert got is not None and got.seq == seq
            assert np.abs(got.image.astype(int) - 77).max() <= 3
        handle.close()
        wait_for(lambda: not w.sessions.count(), 5, what="worker closed the session")
        assert r.get(scfg.keys.session(handle.id)) is None
    finally:
        gw.stop()
        w.stop()


def test_tiny_model_result_through_redis_equals_the_local_engine(scfg: ScaleConfig, tiny_model_dir):
    """A real engine behind the transport: same config and seed → the same pixels as in-process."""
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.runner import EngineRunner

    mcfg = ModelConfig(model=str(tiny_model_dir))
    local = EngineRunner.from_config(mcfg, EngineConfig()).start()
    w = Worker(EngineRunner.from_config(mcfg, EngineConfig()), scfg, worker_id="tiny").start()
    gw = RedisGatewayRunner(scfg, job_timeout_s=60).start()
    try:
        wait_for(lambda: gw.alive, 10, what="gateway sees the tiny worker")
        cfg = StreamConfig(mode="txt2img", prompt="a red square", width=64, height=64, seed=11, steps=2)
        want = local.submit_job(cfg).result(60).image
        got = gw.submit_job(cfg).result(60).image
        assert np.array_equal(got, want)
        src = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        edit = cfg.replace(mode="img2img", strength=0.5, steps=1)
        assert np.array_equal(gw.submit_job(edit, src).result(60).image, local.submit_job(edit, src).result(60).image)
    finally:
        gw.stop()
        w.stop()
        local.stop()


def test_graceful_stop_answers_the_jobs_it_holds_and_stops_beating_at_once(scfg: ScaleConfig, r: redis.Redis):
    import threading

    w = _null_worker(scfg, "leaving", delay_s=0.5).start()
    gw = RedisGatewayRunner(scfg, job_timeout_s=30).start()
    try:
        wait_for(lambda: gw.alive, 10, what="gateway sees the worker")
        futures = [gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=64, height=64, seed=i))
                   for i in range(2)]
        wait_for(lambda: w.jobs.held() == 2, 10, what="the worker holds both jobs")
        stopper = threading.Thread(target=w.stop, kwargs={"drain_s": 10.0})
        stopper.start()
        wait_for(lambda: r.get(scfg.keys.worker(w.id)) is None, 2, what="heartbeat dropped at once")
        for f in futures:
            assert f.result(5).image.shape == (64, 64, 3)
        stopper.join(10)
        assert not stopper.is_alive()
        assert w.counters["jobs_done"] == 2 and r.xlen(scfg.keys.jobs) == 0
        assert r.xpending(scfg.keys.jobs, scfg.keys.group)["pending"] == 0
    finally:
        gw.stop()
        w.stop()


def test_serve_with_redis_is_a_gateway(redis_url: str, tmp_path):
    """The real command line: ``ditstream serve --redis URL`` builds the gateway, /ready follows workers."""
    import subprocess
    import sys

    import httpx
    from ditstream.server.api.factory import load_runner
    from ditstream.server.settings import Settings

    from ditstream.bench.scale_harness import free_port

    url = redis_url.rsplit("/", 1)[0] + "/1"  # its own database: the default key prefix is used here
    assert isinstance(load_runner(Settings(redis_url=url)), RedisGatewayRunner)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ditstream", "serve", "--redis", url, "--port", str(port),
                             "--width", "64", "--height", "64", "--log-level", "warning"], stdout=log,
                            stderr=subprocess.STDOUT)
    w = None
    try:
        base = f"http://127.0.0.1:{port}"
        body = wait_for(lambda: httpx.get(base + "/ready").json(), 60, what="gateway answering")
        assert body["status"] == "not_ready" and body["redis"] is True and body["workers"] == 0
        w = _null_worker(ScaleConfig(redis_url=url, heartbeat_s=0.2, worker_ttl_s=1.0)).start()
        wait_for(lambda: httpx.get(base + "/ready").status_code == 200, 20, what="/ready with a worker")
        r = httpx.post(base + "/v1/images/generations", json={"prompt": "x", "size": "64x64"}, timeout=30)
        assert r.status_code == 200, r.text
        assert "ditstream_workers_up 1.0" in httpx.get(base + "/metrics").text
    finally:
        if w is not None:
            w.stop()
        proc.terminate()
        proc.wait(20)
        log.close()
    assert "gateway for the workers" in (tmp_path / "serve.log").read_text()


def test_jobs_pending_across_a_redis_restart_are_sent_again(tmp_path):
    """Redis runs without persistence: a restart loses the queued job; the gateway re-sends it."""
    with RedisServer(log_dir=tmp_path) as server:
        cfg = ScaleConfig(redis_url=server.url, prefix="rst", heartbeat_s=0.2, worker_ttl_s=1.0, supervise_s=0.1)
        r = redis.Redis.from_url(server.url)
        keys = cfg.keys
        _fake_heartbeat(r, keys)
        gw = RedisGatewayRunner(cfg, job_timeout_s=60).start()
        try:
            wait_for(lambda: gw.alive, 5, what="gateway alive")
            fut = gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=64, height=64))
            wait_for(lambda: r.xlen(keys.jobs) == 1, 5, what="job queued")
            server.restart()
            r = redis.Redis.from_url(server.url)
            wait_for(lambda: gw.counters["jobs_resent"] == 1, 15, what="job re-sent after the restart")
            w = _null_worker(cfg).start()
            try:
                assert fut.result(20).image.shape == (64, 64, 3)
            finally:
                w.stop()
            assert gw.counters["duplicate_answers"] == 0
        finally:
            gw.stop()
            r.close()


def test_worker_health_and_metrics_endpoint(scfg: ScaleConfig):
    """What the container healthcheck and Prometheus read from a worker (``--health-port``)."""
    import httpx

    from ditstream.bench.scale_harness import free_port
    from ditstream.commands.worker import _health_server

    w = _null_worker(scfg, "probe").start()
    port = free_port()
    server = _health_server(w, port)
    try:
        base = f"http://127.0.0.1:{port}"
        health = httpx.get(base + "/health")
        assert health.status_code == 200 and health.json()["worker"] == "probe"
        assert health.json()["engine_alive"] is True
        metrics = httpx.get(base + "/metrics").text
        assert 'ditstream_worker_jobs_done{worker="probe"} 0' in metrics
        w.request_stop()
        assert httpx.get(base + "/health").status_code == 503, "a leaving worker reports unhealthy"
    finally:
        server.shutdown()
        w.stop()


def test_supervisor_leaves_a_session_being_opened_alone_and_retries_a_failed_repin(scfg: ScaleConfig,
                                                                                  r: redis.Redis):
    """Seen once in CI: the supervisor saw a new session with its worker set but no record yet (the
    open was still in flight), "re-pinned" it concurrently and the stream stalled. And a re-pin whose
    open failed used to leave the record naming a worker that never opened the session: no retry."""
    from ditstream.server.scale.gateway import GatewayStreamHandle

    keys = scfg.keys
    _fake_heartbeat(r, keys, "ghost")  # alive by heartbeat, never answers an open
    gw = RedisGatewayRunner(scfg, job_timeout_s=30, open_timeout_s=0.3)  # not started: no supervisor thread
    gw.fleet.workers = {"ghost": Heartbeat.load(r.get(keys.worker("ghost")))}
    h = GatewayStreamHandle(gw.sessions, "s-pinning", StreamConfig(prompt="p", width=64, height=64), None)
    gw.sessions.add(h)
    h.worker, h.pinning = "ghost", True  # add_stream is between choosing the worker and its record
    gw.supervisor.check_sessions()
    assert h.epoch == 0 and r.get(keys.session(h.id)) is None, "the supervisor must not touch it"
    h.pinning = False  # now it looks orphaned: the supervisor re-pins, the open times out
    gw.supervisor.check_sessions()
    assert h.epoch == 1, "the supervisor tried to re-pin"
    assert r.get(keys.session(h.id)) is None, "a failed re-pin leaves no record, so the next pass retries"
    gw.supervisor.check_sessions()
    assert h.epoch == 2
