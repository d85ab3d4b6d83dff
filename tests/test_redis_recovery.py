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
        # The wait above already failed past bound + 2 s, while the survivors were still busy (checked
        # just above): before this fix a busy survivor never claimed, however long one waited. The
        # measured figure (about bound + 0.05 s here) is printed; seconds on a loaded 2-core runner
        # stretch, so no tighter assertion is made on them.
        assert claimed_after <= bound + 2.0, f"claimed after {claimed_after:.2f} s (bound {bound:.1f} s)"
        assert sum(w.counters["jobs_claimed"] for w in survivors) == 4
        held = [w.jobs.held() for w in survivors]
        assert max(held) <= 2 * scfg.max_jobs, f"held {held}: over 2 * max_jobs"

        wait_for(lambda: r.xlen(reply_to) >= len(jobs), 30, what="every job answered")
        answered = [JobResult.load(fields_get(f, "m") or b"").job for _id, f in r.xrange(reply_to)]
        assert sorted(answered) == sorted(jobs), "every job answered exactly once"
        print(f"dead worker's jobs claimed after {claimed_after:.2f} s (bound {bound:.1f} s), "
              f"{undelivered} jobs still queued then")
    finally:
        for w in survivors:
            w.stop()
        r.close()


def test_a_new_gateway_is_ready_within_5_s_of_start_while_two_workers_are_busy(redis_url: str):
    """Gateway restart bound: a fresh gateway process (imports included) answers ``/ready`` 200 within
    5 s while both workers are saturated (their heartbeats have their own thread)."""
    import json
    import subprocess
    import sys

    scfg = ScaleConfig(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", heartbeat_s=0.5, max_jobs=2)
    r = redis.Redis.from_url(redis_url)
    reply_to = f"{scfg.prefix}:test-replies"
    ensure_group(r, scfg.keys)
    for seed in range(80):
        _add_job(r, scfg, reply_to, seed)
    workers = [_null_worker(scfg, wid, delay_s=0.25).start() for wid in ("b1", "b2")]
    code = f"""
import time
t0 = time.monotonic()
import json, httpx
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from ditstream.bench.harness import ServerThread
with ServerThread(create_app(Settings(redis_url={redis_url!r}, redis_prefix={scfg.prefix!r}))) as srv:
    while True:
        resp = httpx.get(srv.url + "/ready")
        if resp.status_code == 200 or time.monotonic() - t0 > 30:
            break
        time.sleep(0.02)
    print(json.dumps({{"status": resp.status_code, "body": resp.json(), "ready_after_s": time.monotonic() - t0}}))
"""
    try:
        wait_for(lambda: all(w.jobs.held() >= scfg.max_jobs for w in workers), 10, interval=0.02,
                 what="both workers busy")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        busy = [w.jobs.held() for w in workers]
        queued = r.xlen(scfg.keys.jobs) - r.xpending(scfg.keys.jobs, scfg.keys.group)["pending"]
        print(f"new gateway ready after {got['ready_after_s']:.2f} s; workers holding {busy}, {queued} queued")
        assert got["status"] == 200 and got["body"]["workers"] == 2, got
        assert queued > 0, "the workers were not busy throughout: the test proves nothing"
        assert got["ready_after_s"] < 5.0, got
    finally:
        for w in workers:
            w.stop(drain_s=0.5)
        r.close()


def test_a_dead_workers_sessions_reopen_together_not_one_after_another(redis_url: str):
    """4 sessions of a dead worker move to a survivor whose engine is busy (0.5 s ticks with its own
    stream): opened one after another they would take about 4 ticks; together they take one."""
    import threading

    import numpy as np
    from ditstream.server.scale.gateway import RedisGatewayRunner

    tick = 0.5
    scfg = ScaleConfig(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", heartbeat_s=0.2, worker_ttl_s=1.0,
                       supervise_s=0.05, rebalance_s=0.0)  # re-pins only
    a = _null_worker(scfg, "a", delay_s=0.0).start()
    gw = RedisGatewayRunner(scfg, job_timeout_s=30).start()
    b = None
    stop = threading.Event()
    try:
        wait_for(lambda: set(gw.workers) == {"a"}, 10, what="gateway sees worker a")
        moving = [gw.add_stream(StreamConfig(prompt="p", width=SIZE, height=SIZE)) for _ in range(4)]
        assert {h.worker for h in moving} == {"a"}
        b = _null_worker(scfg, "b", delay_s=tick).start()
        wait_for(lambda: set(gw.workers) == {"a", "b"}, 10, what="gateway sees worker b")
        busy = gw.add_stream(StreamConfig(prompt="p", width=SIZE, height=SIZE))
        assert busy.worker == "b"

        def feed() -> None:  # keeps b's engine ticking
            seq = 0
            while not stop.is_set():
                busy.submit(np.zeros((SIZE, SIZE, 3), np.uint8), seq, float(seq))
                seq += 1
                stop.wait(0.02)

        threading.Thread(target=feed, daemon=True).start()
        wait_for(lambda: b.runner.core.batch_sizes, 10, what="b's engine ticking")
        a.stop(drain_s=0.0)  # its heartbeat goes at once: the next gateway pass re-pins its sessions
        wait_for(lambda: "a" not in gw.workers, 5, interval=0.005, what="gateway noticed a gone")
        t_lost = time.monotonic()
        # Counted in b's engine ticks, not seconds (a loaded machine stretches seconds, not ticks): the
        # tick count at which each re-pin completed. One after another, each open waits for a tick of
        # its own (4 re-pins span >= 3 ticks); together they land within one.
        tick_at: dict[int, int] = {}

        def repinned() -> bool:
            n = gw.counters["sessions_repinned"]
            tick_at.setdefault(n, b.runner.ticks)
            return n >= 4

        wait_for(repinned, 10, interval=0.005, what="4 sessions re-pinned")
        took = time.monotonic() - t_lost
        first = min(v for k, v in tick_at.items() if k >= 1)
        print(f"4 sessions re-pinned in {took:.2f} s over {tick_at[max(tick_at)] - first} engine tick(s) of {tick} s")
        assert {h.worker for h in moving} == {"b"}
        assert tick_at[max(tick_at)] - first <= 1, f"re-pins spread over ticks {tick_at}: one after another"
    finally:
        stop.set()
        gw.stop()
        for w in (a, b):
            if w is not None:
                w.stop(drain_s=0.0)
