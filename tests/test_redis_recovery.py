"""Issue 17, recovery bounds over a real ``redis-server`` (workers in-process over null engines):
a dead worker's jobs are claimed within ``claim_idle_s`` plus one heartbeat even when every
survivor is busy (docs/deploy.md, "Recovery bounds")."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.server.scale.config import ScaleConfig, ensure_group, fields_get
from ditstream.server.scale.messages import JobMessage, JobResult, config_to_wire
from ditstream.server.scale.worker import Worker

from ditstream.bench.scale_harness import wait_for

pytestmark = pytest.mark.timeout(90)

SIZE = 64


def _null_worker(scfg: ScaleConfig, wid: str, delay_s: float) -> Worker:
    from ditstream.engine.null import null_runner

    return Worker(null_runner(EngineConfig(), delay_s=delay_s), scfg, worker_id=wid)


def _add_job(r: redis.Redis, scfg: ScaleConfig, reply_to: str, seed: int) -> str:
    cfg = StreamConfig(mode="txt2img", prompt="p", width=SIZE, height=SIZE, seed=seed)
    msg = JobMessage(reply_to=reply_to, config=config_to_wire(cfg), deadline=time.time() + 60)
    r.xadd(scfg.keys.jobs, {"m": msg.dump()})
    return msg.job


def test_a_dead_workers_jobs_are_claimed_within_the_bound_while_survivors_are_busy(redis_url: str):
    scfg = ScaleConfig(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", heartbeat_s=0.2, worker_ttl_s=1.0,
                       claim_idle_s=1.0, max_jobs=2)
    bound = scfg.claim_idle_s + scfg.heartbeat_s
    r = redis.Redis.from_url(redis_url)
    reply_to = f"{scfg.prefix}:test-replies"
    ensure_group(r, scfg.keys)
    # The dead worker: it took 4 jobs and died before answering any (no heartbeat, never acks).
    jobs = [_add_job(r, scfg, reply_to, seed) for seed in range(4)]
    taken = r.xreadgroup(scfg.keys.group, "dead", {scfg.keys.jobs: ">"}, count=4)
    t_dead = time.monotonic()
    assert len(taken[0][1]) == 4
    # A backlog that keeps both survivors at max_jobs for several seconds.
    jobs += [_add_job(r, scfg, reply_to, seed) for seed in range(4, 64)]
    survivors = [_null_worker(scfg, wid, delay_s=0.25).start() for wid in ("s1", "s2")]
    try:
        def dead_jobs_left() -> int:
            return len(r.xpending_range(scfg.keys.jobs, scfg.keys.group, "-", "+", 100, consumername="dead"))

        wait_for(lambda: dead_jobs_left() == 0, bound + 2.0, interval=0.02, what="the dead worker's jobs claimed")
        claimed_after = time.monotonic() - t_dead
        pending = r.xpending(scfg.keys.jobs, scfg.keys.group)["pending"]
        undelivered = r.xlen(scfg.keys.jobs) - pending
        assert undelivered > 0, "the survivors were not busy: the test proves nothing"
        assert claimed_after <= bound + 0.3, f"claimed after {claimed_after:.2f} s (bound {bound:.1f} s)"
        assert sum(w.counters["jobs_claimed"] for w in survivors) == 4
        assert all(len(w._jobs) <= 2 * scfg.max_jobs for w in survivors)

        wait_for(lambda: r.xlen(reply_to) >= len(jobs), 30, what="every job answered")
        answered = [JobResult.load(fields_get(f, "m") or b"").job for _id, f in r.xrange(reply_to)]
        assert sorted(answered) == sorted(jobs), "every job answered exactly once"
        print(f"dead worker's jobs claimed after {claimed_after:.2f} s (bound {bound:.1f} s), "
              f"{undelivered} jobs still queued then")
    finally:
        for w in survivors:
            w.stop()
        r.close()
