"""Scale-out: a poison job ends in the dead-letter stream after N tries, and every worker lives on.

Real ``redis-server``; two in-process workers, each over the tiny model with a ``FaultyBackend``
whose fault fires on every call of the poison job's size; a gateway submits the jobs. Waits are on
the gateway's futures (the worker writes the dead letter before it answers).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis
from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import GenerationError
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.gateway import RedisGatewayRunner
from ditstream.server.scale.messages import JobMessage
from ditstream.server.scale.worker import Worker
from faults import faulty_runner, width_is

from ditstream.bench.scale_harness import wait_for

pytestmark = pytest.mark.timeout(180)


GOOD, POISON = 32, 64



def test_poison_job_is_dead_lettered_after_max_attempts_and_no_worker_dies(redis_url, tiny_model_dir,
                                                                          tiny_components):
    scfg = ScaleConfig(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", heartbeat_s=0.2, worker_ttl_s=5.0,
                       claim_idle_s=5.0, max_attempts=3, max_jobs=2, supervise_s=0.1)
    scale = tiny_components.vae_scale_factor
    workers, faults = [], []
    for wid in ("wa", "wb"):
        runner, backend = faulty_runner(tiny_model_dir)
        faults.append(backend.inject("denoise", error=RuntimeError("poisoned batch"),
                                     when=width_is(POISON, scale), times=100))
        workers.append(Worker(runner, scfg, worker_id=wid).start())
    gw = RedisGatewayRunner(scfg, job_timeout_s=60).start()
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: len(gw.workers) == 2, 10, what="gateway sees both workers")
        poison = gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=POISON, height=POISON))
        with pytest.raises(GenerationError, match="failed 3 times"):
            poison.result(60)
        (_id, fields), = r.xrange(scfg.keys.dead_letter)
        assert JobMessage.load(fields[b"m"]).config["width"] == POISON
        assert b"poisoned batch" in fields[b"reason"] and b"failed 3 times" in fields[b"reason"]
        tried = sum(100 - f.times for f in faults)
        assert tried == scfg.max_attempts, "each attempt ran once; then the dead-letter stream, not more workers"
        assert sum(w.counters["jobs_retried"] for w in workers) == scfg.max_attempts - 1
        assert sum(w.counters["jobs_dead_lettered"] for w in workers) == 1
        for w in workers:  # every worker is still up and serving
            assert w.error is None and w.runner.alive and not w.stopping
        outs = [gw.submit_job(StreamConfig(mode="txt2img", prompt="p", width=GOOD, height=GOOD, seed=s))
                for s in range(4)]
        for f in outs:
            assert f.result(60).image.shape == (GOOD, GOOD, 3)
        assert r.xlen(scfg.keys.dead_letter) == 1 and r.xlen(scfg.keys.jobs) == 0
    finally:
        gw.stop()
        for w in workers:
            w.stop()
        r.close()


def test_a_failed_session_frame_reaches_the_gateway_as_an_error_and_the_session_goes_on(redis_url, tiny_model_dir,
                                                                                        tiny_components):
    scfg = ScaleConfig(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", heartbeat_s=0.2, worker_ttl_s=5.0,
                       claim_idle_s=5.0, max_attempts=3, supervise_s=0.1)
    runner, backend = faulty_runner(tiny_model_dir)
    w = Worker(runner, scfg, worker_id="ws").start()
    gw = RedisGatewayRunner(scfg, job_timeout_s=60).start()
    try:
        wait_for(lambda: len(gw.workers) == 1, 10, what="gateway sees the worker")
        handle = gw.add_stream(StreamConfig(prompt="p", width=GOOD, height=GOOD), notify=None)
        rs = np.random.RandomState(0)
        for seq in range(4):
            if seq == 1:
                backend.inject("decode", error=RuntimeError("decoder exploded"))
            handle.submit((rs.rand(GOOD, GOOD, 3) * 255).astype(np.uint8), seq, float(seq))
            out = handle.outputs.get(timeout=30)
            assert out is not None and out.seq == seq
            if seq == 1:
                assert isinstance(out.error, GenerationError) and out.image is None
                assert "decoder exploded" in out.error.message
            else:
                assert out.error is None and out.image.shape == (GOOD, GOOD, 3)
        assert handle.stats.failed == 1 and w.error is None and runner.alive
        handle.close()
    finally:
        gw.stop()
        w.stop()
