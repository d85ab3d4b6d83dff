"""A worker's profile (its backend's size limits and its LoRA adapters) travels in its heartbeat, and
the gateway refuses a stream or job outside it itself — at open or submit, with the error an
in-process engine raises, before anything is queued for a worker."""

from __future__ import annotations

import uuid

import pytest
import redis
from ditstream.engine.backends.base import BackendLimits
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.errors import ValidationError
from ditstream.engine.lora import resolve_set
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.gateway import RedisGatewayRunner
from ditstream.server.scale.messages import Heartbeat
from ditstream.server.scale.worker import Worker

from ditstream.bench.scale_harness import wait_for

pytestmark = pytest.mark.timeout(120)

LIMITS = BackendLimits(max_batch=8, width=(64, 128), height=(64, 128))
LORAS = {"swap": 0.0}


@pytest.fixture
def scfg(redis_url: str) -> ScaleConfig:
    return ScaleConfig(redis_url=redis_url, prefix=f"p{uuid.uuid4().hex[:8]}", heartbeat_s=0.2, worker_ttl_s=1.0,
                       supervise_s=0.1)


@pytest.fixture
def r(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _in_process_error(check, *args) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        check(*args)
    return info.value


def test_a_worker_advertises_its_limits_and_adapters(scfg: ScaleConfig, r: redis.Redis):
    from ditstream.engine.null import null_runner

    runner = null_runner(EngineConfig())
    runner.info = {**runner.info, "limits": LIMITS.as_dict(), "loras": LORAS}
    w = Worker(runner, scfg, worker_id="wp").start()
    try:
        raw = wait_for(lambda: r.get(scfg.keys.worker("wp")), 10, what="the worker's heartbeat")
        info = Heartbeat.load(raw).info
        assert info["limits"] == LIMITS.as_dict() and info["loras"] == LORAS
    finally:
        w.stop(drain_s=0)


def test_gateway_refuses_what_its_workers_would_at_open_before_anything_is_queued(scfg: ScaleConfig,
                                                                                   r: redis.Redis):
    keys = scfg.keys
    info = {"size_multiple": 8, "limits": LIMITS.as_dict(), "loras": LORAS}
    # A worker that beats but never answers: whatever reached it would time out, not fail fast.
    r.set(keys.worker("ghost"), Heartbeat(worker="ghost", info=info).dump(), px=60_000)
    r.sadd(keys.workers, "ghost")
    gw = RedisGatewayRunner(scfg, job_timeout_s=30, open_timeout_s=5.0).start()
    try:
        wait_for(lambda: gw.alive, 5, what="gateway alive")
        too_wide = StreamConfig(mode="txt2img", prompt="p", width=256, height=64)
        unknown = StreamConfig(mode="txt2img", prompt="p", width=64, height=64, loras={"nope": 1.0})
        cases = [(too_wide, _in_process_error(LIMITS.check_size, 256, 64)),
                 (unknown, _in_process_error(resolve_set, {"nope": 1.0}, LORAS))]
        for cfg, want in cases:
            for open_ in (gw.add_stream, gw.submit_job):
                with pytest.raises(ValidationError) as got:
                    open_(cfg)
                assert (type(got.value), got.value.message, got.value.field) == (type(want), want.message, want.field)
        assert r.xlen(keys.jobs) == 0, "a refused job was queued"
        assert not r.exists(keys.worker_control("ghost")), "a refused stream was sent to a worker"
        assert not list(r.scan_iter(keys.session("*"))), "a refused stream left a session record"
        fine = gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=128, height=64, loras={"swap": 1.0}))  # within both
        wait_for(lambda: r.xlen(keys.jobs) == 1, 5, what="the job within the profile queued")
        fine.cancel()
    finally:
        gw.stop()
