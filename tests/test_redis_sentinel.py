"""A Redis Sentinel failover under load (issue 29): Debian's ``redis-server`` as primary and one
replica, three sentinels (``redis-server --sentinel``), all on loopback; two null workers (real
processes) and an in-process gateway, all on ``redis+sentinel://``; 4 streams and 30 REST jobs.

The replica is made to lag on purpose before the primary is SIGKILLed: pointed at a dead port, it
keeps what it had (the 6 jobs answered before, the 16 jobs sent before) and misses the writes of
the last moment (8 jobs sent then), as an asynchronous replica does when its primary dies. Asserts:

- the sentinels promote the replica and the streams resume within 10 s, with no output duplicated,
  out of order or foreign (another stream's image) over the whole run;
- every job is answered exactly once with its own image: the gateway sends again exactly the jobs
  the new primary lacks (their entries were on the dead primary only), not the ones it kept;
- the jobs answered before the kill stay answered: their ``done:`` marks are on the new primary,
  so no worker runs them again.

Figures: docs/reliability.md ("Redis Sentinel failover").
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.gateway import RedisGatewayRunner
from ditstream.server.scale.redis_conn import RedisTarget
from fleetkit import SIZE, FrameLog, Stream
from test_redis_chaos import _job_report

from ditstream.bench.scale_harness import WorkerProcess, _preexec, free_port, redis_server_binary, wait_for

pytestmark = pytest.mark.timeout(120)

MASTER = "ds"
N_STREAMS, N_ANSWERED, N_KEPT, N_LOST = 4, 6, 16, 8
HEARTBEAT_S, TTL_S, CLAIM_IDLE_S, SUPERVISE_S, DELAY_MS = 0.3, 3.0, 1.5, 0.1, 100
#: The issue's bound: from the kill to every stream's next output.
RESUME_BOUND_S = 10.0


class SentinelRedis:
    """A primary, one replica and three sentinels on loopback (quorum 2, down after 500 ms, failover
    timeout 2 s). Each sentinel is told its id, its peers and the replica in its config file, so the
    set is ready at once instead of after the sentinels' discovery rounds (2 s each)."""

    def __init__(self, tmp: Path) -> None:
        binary = redis_server_binary()
        if binary is None:
            pytest.fail("redis-server is required (apt-get install -y redis-server)", pytrace=False)
        self.binary = binary
        self.tmp = tmp
        self.primary, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.sentinels)}/{MASTER}/0"

    def _spawn(self, port: int, args: list[str]) -> None:
        with open(self.tmp / f"redis-{port}.log", "ab") as log:  # the child has its own copy
            self.procs[port] = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT,
                                                preexec_fn=_preexec())

    def start(self) -> SentinelRedis:
        # --dir: a replica's full sync writes the primary's snapshot there (not into the working directory).
        data = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning", "--dir",
                str(self.tmp)]
        self._spawn(self.primary, ["--port", str(self.primary), *data])
        self._spawn(self.replica, ["--port", str(self.replica), *data, "--replicaof", "127.0.0.1", str(self.primary)])
        ids = {p: uuid.uuid4().hex + uuid.uuid4().hex[:8] for p in self.sentinels}
        for port in self.sentinels:
            conf = self.tmp / f"sentinel-{port}.conf"
            lines = [f"port {port}", "bind 127.0.0.1", f"dir {self.tmp}", f"sentinel myid {ids[port]}",
                     f"sentinel monitor {MASTER} 127.0.0.1 {self.primary} 2",
                     f"sentinel down-after-milliseconds {MASTER} 500", f"sentinel failover-timeout {MASTER} 2000",
                     f"sentinel known-replica {MASTER} 127.0.0.1 {self.replica}",
                     *(f"sentinel known-sentinel {MASTER} 127.0.0.1 {p} {ids[p]}" for p in self.sentinels if p != port)]
            conf.write_text("\n".join(lines) + "\n")
            self._spawn(port, [str(conf), "--sentinel"])
        wait_for(self._ready, 15, what="the replica in sync and the sentinels watching it")
        return self

    def _ready(self) -> bool:
        with redis.Redis(port=self.replica) as r:
            if r.info("replication").get("master_link_status") != "up":
                return False
        for port in self.sentinels:
            with redis.Redis(port=port) as s:
                state = s.sentinel_master(MASTER)
                if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                    return False
        return True

    def master_port(self) -> int:
        """Where the sentinels say the primary is now."""
        with redis.Redis(port=self.sentinels[0]) as s:
            return int(s.sentinel_get_master_addr_by_name(MASTER)[1])

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)


@contextlib.contextmanager
def _fleet(tmp_path: Path) -> Iterator[tuple[SentinelRedis, list[WorkerProcess]]]:
    """The Sentinel set and 2 null workers on it (100 ms ticks, 2 jobs each, short timeouts)."""
    sent = SentinelRedis(tmp_path)
    workers: list[WorkerProcess] = []
    try:
        sent.start()
        workers = [WorkerProcess(sent.url, "--model", "null", "--null-delay-ms", str(DELAY_MS), "--max-jobs", "2",
                                 "--heartbeat-s", str(HEARTBEAT_S), "--ttl-s", str(TTL_S), "--claim-idle-s",
                                 str(CLAIM_IDLE_S), "--threads", "1", worker_id=f"w{n}",
                                 log=tmp_path / f"w{n}.log").start() for n in range(2)]
        yield sent, workers
    finally:
        for w in workers:
            w.stop()
        sent.stop()


def _jobs(gw: RedisGatewayRunner, base: int, n: int) -> list[tuple[int, Any]]:
    """``n`` img2img jobs; the null engine echoes each job's image, whose shade names the job."""
    cfg = StreamConfig(mode="img2img", prompt="p", width=SIZE, height=SIZE)
    return [(i, gw.submit_job(cfg, np.full((SIZE, SIZE, 3), i % 250, np.uint8))) for i in range(base, base + n)]


def _sent(gw: RedisGatewayRunner, n_pending: int) -> bool:
    """Every pending job has its entry in the jobs stream (the publisher wrote it)."""
    return len(gw.jobs.sent_entries()) >= n_pending


def test_sentinel_failover_under_load(tmp_path: Path):
    t_start = time.monotonic()
    with _fleet(tmp_path) as (sent, workers):
        scfg = ScaleConfig(redis_url=sent.url, heartbeat_s=HEARTBEAT_S, worker_ttl_s=TTL_S,
                           claim_idle_s=CLAIM_IDLE_S, supervise_s=SUPERVISE_S, max_jobs=2)
        assert scfg.redis.is_sentinel and scfg.redis.master == MASTER
        gw = RedisGatewayRunner(scfg, EngineConfig(output_queue_size=64), job_timeout_s=15).start()
        primary = redis.Redis(port=sent.primary)
        streams: list[Stream] = []
        fig: dict[str, Any] = {}
        try:
            try:
                wait_for(lambda: len(gw.workers) == 2, 60, what="2 workers beating")
            except TimeoutError:
                raise AssertionError("\n".join(w.log_tail(2000) for w in workers)) from None
            streams = [Stream(gw, FrameLog(k)) for k in range(N_STREAMS)]
            wait_for(lambda: all(len(s.log.got) >= 3 for s in streams), 20, what="outputs flowing")

            answered = _jobs(gw, 0, N_ANSWERED)  # answered, and their done: marks on the replica
            wait([f for _i, f in answered], timeout=20)
            answered_ids = list(gw.jobs.answered_by())
            kept = _jobs(gw, 100, N_KEPT)  # sent, and on the replica
            wait_for(lambda: _sent(gw, gw.jobs.count()), 10, interval=0.005, what="the jobs sent")
            primary.set("sentinel-test:barrier", 1)  # WAIT waits for this connection's writes: all before it
            assert primary.wait(1, 2000) == 1, "the replica did not take the writes so far"
            redis.Redis(port=sent.replica).replicaof("127.0.0.1", free_port())  # lags from now on
            lost = _jobs(gw, 200, N_LOST)  # sent to the primary only
            wait_for(lambda: _sent(gw, gw.jobs.count()), 10, interval=0.005, what="the jobs sent")
            sent.procs[sent.primary].kill()
            sent.procs[sent.primary].wait(5)
            t_kill = time.monotonic()
            # An upper bound: an answer already read off the dead primary's socket may still resolve a job.
            fig["kept_in_flight"] = sum(not f.done() for _i, f in kept)
            fig["lost_in_flight"] = sum(not f.done() for _i, f in lost)

            wait_for(lambda: sent.master_port() == sent.replica, 15, interval=0.05, what="the replica promoted")
            fig["promoted_s"] = round(time.monotonic() - t_kill, 2)
            fig["jobs"] = _job_report(kept + lost)
            wait_for(lambda: all(s.log.since(t_kill) >= 5 for s in streams), 20, what="every stream resumed")
            t_end = time.monotonic()
            fig["streams"] = [s.log.report(t_kill, t_end) for s in streams]
            fig["resent"] = gw.counters["jobs_resent"]
            fig["duplicate_answers"] = gw.counters["duplicate_answers"]
            with redis.Redis(port=sent.replica) as new:
                fig["answered_marks_kept"] = sum(new.exists(scfg.keys.done(j)) for j in answered_ids)
        finally:
            for s in streams:
                s.close()
            gw.stop()
            primary.close()
    fig["runtime_s"] = round(time.monotonic() - t_start, 1)
    st = fig["streams"]
    print(f"\nsentinel failover: replica promoted {fig['promoted_s']} s after the kill; jobs in flight "
          f"{fig['kept_in_flight']} kept + {fig['lost_in_flight']} lost by the new primary, re-sent "
          f"{fig['resent']}; {fig['jobs']}; duplicate answers {fig['duplicate_answers']} (gateway); answered "
          f"before: {fig['answered_marks_kept']}/{N_ANSWERED} marks kept; streams: longest gap "
          f"{max(s['longest_gap_s'] for s in st):.2f} s, duplicated {sum(s['duplicated'] for s in st)}, out of "
          f"order {sum(s['out_of_order'] for s in st)}, foreign {sum(s['foreign'] for s in st)}; runtime "
          f"{fig['runtime_s']} s")

    assert fig["jobs"] == {"answered_once": N_KEPT + N_LOST, "lost": 0, "foreign": 0}, fig
    assert fig["lost_in_flight"] > 0 and fig["kept_in_flight"] > 0, f"the kill found no job of each kind: {fig}"
    # Re-sent: some (the lag lost jobs), never more than the new primary lacked (none of the kept ones).
    # A lacked job left out would be lost (its entry is nowhere): ``lost`` above is 0.
    assert 0 < fig["resent"] <= fig["lost_in_flight"], f"re-sent other jobs than the ones the new primary lacked: {fig}"
    assert fig["answered_marks_kept"] == N_ANSWERED, fig
    for s in st:
        assert (s["duplicated"], s["out_of_order"], s["foreign"]) == (0, 0, 0), s
        assert s["longest_gap_s"] <= RESUME_BOUND_S, s


def test_sentinel_urls_parsed_once():
    """The URL forms: a plain one goes to redis-py as it is; a Sentinel one is taken apart; a bad one
    is refused with its reason (and without its password)."""
    t = RedisTarget.parse("redis+sentinel://:p%40ss@10.0.0.1:26379,[::1]:26380/mymaster/2")
    assert (t.sentinels, t.master, t.db, t.password) == ((("10.0.0.1", 26379), ("::1", 26380)), "mymaster", 2, "p@ss")
    assert RedisTarget.parse("redis+sentinel://h:1/m").db == 0
    assert not RedisTarget.parse("rediss://:pw@h:6380/1").is_sentinel
    for bad, why in [("redis+sentinel://h:1", "is not"), ("redis+sentinel://h/m", "host:port"),
                     ("redis+sentinel://h:1/m/x", "must be a number"), ("http://h:1/0", "unsupported"),
                     ("redis+sentinel://:secret@h:1/m/0/1", "is not")]:
        with pytest.raises(ValueError, match=why) as err:
            RedisTarget.parse(bad)
        assert "secret" not in str(err.value)
