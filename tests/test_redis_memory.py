"""Issue 17, bounded Redis under REST load: 300 jobs at 512² through a real gateway process and a
``ditstream worker --model null`` process, 16 at a time, leave ≤ 5 MB of Redis memory behind once
their replies are read (docs/deploy.md, "Bounded Redis").

Results travel raw (786 KB per 512² image), so while jobs run Redis holds up to one raw result per
unread reply; once read, each reply is deleted, and what stays is a small ``done:<job>`` mark per job
(until ``done_ttl_s``). Measured as ``used_memory`` against a baseline taken with the gateway and
the worker up and idle (all of it, and the keys' own ``MEMORY USAGE``); the peak during the run is
printed (the in-flight figure).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from ditstream.server.scale.config import ScaleConfig

from ditstream.bench.scale_harness import (
    GatewayProcess,
    RedisServer,
    WorkerProcess,
    redis_server_binary,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

N_JOBS, CONCURRENCY, SIDE = 300, 16, 512
#: Issue 17: Redis memory used by replies once they are read.
REPLY_MEMORY_BOUND = 5 * 1024 * 1024


def test_300_rest_jobs_at_512_leave_under_5_mb_of_redis_memory_once_read(tmp_path: Path):
    if redis_server_binary() is None:
        pytest.fail("redis-server is required (apt-get install -y redis-server)", pytrace=False)
    env = {"DITSTREAM_WORKER_HEARTBEAT_S": "0.3", "DITSTREAM_WORKER_TTL_S": "1.5", "DITSTREAM_API_KEYS": ""}
    with RedisServer(log_dir=tmp_path) as server:
        keys = ScaleConfig(redis_url=server.url).keys
        worker = WorkerProcess(server.url, "--model", "null", "--max-jobs", "4", "--threads", "1",
                               "--heartbeat-s", "0.3", "--ttl-s", "1.5", worker_id="w1",
                               log=tmp_path / "w1.log").start()
        gw = GatewayProcess(server.url, "--max-queued-jobs", str(2 * CONCURRENCY), log=tmp_path / "gw.log",
                            env=env).start()
        r = redis.Redis.from_url(server.url)
        try:
            try:
                gw.wait_ready(90)
            except (TimeoutError, RuntimeError) as exc:
                raise AssertionError(f"{exc}\n{worker.log_tail(2000)}") from None
            # The peak before this is start-up's, far below the run's.
            base, base_keys = r.info("memory"), _keys_memory(r)
            t0 = time.monotonic()
            statuses = asyncio.run(_run_jobs(gw.url))
            took = time.monotonic() - t0
            gw_id = next(k.decode().rsplit(":", 1)[1] for k in r.keys(keys.gateway("*")))
            replies = keys.replies(gw_id)
            wait_for(lambda: r.xlen(replies) == 0 and r.xlen(keys.jobs) == 0, 10, interval=0.02,
                     what="every reply read and every job acknowledged")
            mem = r.info("memory")
            used = mem["used_memory"] - base["used_memory"]
            data = _keys_memory(r) - base_keys
            clients = mem["mem_clients_normal"] - base["mem_clients_normal"]
            done_keys = list(r.scan_iter(match=keys.done("*"), count=1000))
            done_bytes = sum(r.memory_usage(k) or 0 for k in done_keys)
            streams = {k: r.memory_usage(k) or 0 for k in (replies, keys.jobs)}
        finally:
            gw.stop()
            worker.stop()
            r.close()

    print(f"\n{N_JOBS} jobs at {SIDE}² ({CONCURRENCY} at a time) in {took:.1f} s: Redis memory after they were "
          f"read +{used / 1e6:.2f} MB over the idle baseline (bound {REPLY_MEMORY_BOUND / 2**20:.0f} MiB): keys "
          f"+{data / 1e6:.2f} MB ({len(done_keys)} done marks {done_bytes / 1e3:.0f} KB; streams {streams}), "
          f"client buffers +{clients / 1e6:.2f} MB; peak during the run "
          f"+{(mem['used_memory_peak'] - base['used_memory']) / 1e6:.1f} MB")
    assert statuses == [200] * N_JOBS, f"not every job succeeded: {sorted(set(statuses))}"
    assert len(done_keys) == N_JOBS
    assert data <= REPLY_MEMORY_BOUND, f"Redis keys hold {data / 1e6:.2f} MB more after the replies were read"
    # What an operator sees (``used_memory``) also counts connection buffers, which Redis shrinks lazily.
    assert used <= REPLY_MEMORY_BOUND, f"Redis uses {used / 1e6:.2f} MB more after the replies were read"


def _keys_memory(r: redis.Redis) -> int:
    """``MEMORY USAGE`` summed over every key: what the data (replies, marks, streams) holds."""
    return sum(r.memory_usage(k, samples=0) or 0 for k in r.scan_iter(count=1000))


async def _run_jobs(url: str) -> list[int]:
    """``N_JOBS`` txt2img requests at 512², ``CONCURRENCY`` at a time; their status codes."""
    import httpx

    sem = asyncio.Semaphore(CONCURRENCY)

    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int) -> int:
            async with sem:
                resp = await client.post(url + "/v1/images/generations",
                                         json={"prompt": "p", "size": f"{SIDE}x{SIDE}", "seed": i,
                                               "output_format": "jpeg"})
                return resp.status_code

        return list(await asyncio.gather(*(one(i) for i in range(N_JOBS))))
