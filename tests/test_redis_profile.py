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
from ditstream.engine.limits import EngineLimits
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
        hb = Heartbeat.load(raw)
        assert hb.info["limits"] == LIMITS.as_dict() and hb.info["loras"] == LORAS  # shown by /v1/models
        assert hb.limits == runner.limits  # what the gateway checks against, typed
    finally:
        w.stop(drain_s=0)


def test_gateway_refuses_what_its_workers_would_at_open_before_anything_is_queued(scfg: ScaleConfig,
                                                                                   r: redis.Redis):
    keys = scfg.keys
    info = {"size_multiple": 8, "limits": LIMITS.as_dict(), "loras": LORAS}
    limits = EngineLimits(size_multiple=8, profile=LIMITS, loras=tuple(LORAS))
    # A worker that beats but never answers: whatever reached it would time out, not fail fast.
    r.set(keys.worker("ghost"), Heartbeat(worker="ghost", info=info, limits=limits).dump(), px=60_000)
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


def test_a_fleet_accepts_only_what_every_live_worker_accepts():
    """The gateway narrows its workers' limits together (any of them may take a job or a re-pinned
    stream): the coarser size multiple, the overlap of the profiles, the adapters all of them loaded."""
    from ditstream.engine.limits import validate_stream

    a = EngineLimits(size_multiple=8, profile=BackendLimits(width=(64, 128), height=(64, 128)), loras=("swap", "x"))
    b = EngineLimits(size_multiple=16, profile=BackendLimits(width=(96, 256)), loras=("swap",))
    fleet = a.narrowed(b)
    assert (fleet.size_multiple, fleet.profile.width, fleet.profile.height, fleet.loras) == (16, (96, 128), (64, 128),
                                                                                            ("swap",))
    validate_stream(StreamConfig(mode="txt2img", prompt="p", width=112, height=64, loras={"swap": 1.0}), fleet)
    for bad in (dict(width=64, height=64), dict(width=104, height=64), dict(width=112, height=64, loras={"x": 1.0})):
        with pytest.raises(ValidationError):
            validate_stream(StreamConfig(mode="txt2img", prompt="p", **bad), fleet)
