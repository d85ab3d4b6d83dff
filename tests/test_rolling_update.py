"""Rolling update of the workers (issue 29): 4 streams and 30 REST jobs on two ``ditstream worker``
processes running the demo model; a third worker joins (the gateway moves a session onto it while
both ends are alive), then the first is told to stop (SIGTERM, as Kubernetes does): it leaves the
fleet at once, answers the jobs it holds and exits 0, and its sessions move to the others.

Judged from the clients' side (an in-process gateway on a private ``redis-server``): every stream's
longest wait around the join and around the SIGTERM ≤ 1 s; no frame duplicated, out of order or
foreign over the whole run; every job answered once with its own image — and, from the workers'
own logs, no job computed or answered twice (no worker died, so nothing may be run again).

Frame identity with a generating model: stream k asks for a circle in its own two colours (the
demo model takes the prompt's colours, and one-step img2img keeps the input's position: model card,
centroid error ≤ 1.5 px), and frame ``seq`` puts the circle on cell ``seq mod 9`` of a 3 × 3 grid
14 px apart. An output is its stream's frame ``seq`` when ``engine.demo.evaluator`` reads back the
stream's colours and a centroid within ``CENTROID_TOL_PX`` of that cell, so another stream's frame
(other colours) or a neighbouring seq's (a cell ≥ 14 px away) cannot pass. Jobs are told apart the
same way (each its own colour pair). Figures: docs/reliability.md ("Rolling update").
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.demo.dataset import COLOUR_NAMES, ShapeSpec, caption_for, render
from ditstream.engine.demo.evaluator import read_image
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.gateway import RedisGatewayRunner
from fleetkit import FrameLog, Stream, judge_workers

from ditstream.bench.scale_harness import RedisServer, WorkerProcess, redis_server_binary, wait_for

pytestmark = pytest.mark.timeout(150)

SIZE, N_STREAMS, N_JOBS = 64, 4, 30
HEARTBEAT_S, TTL_S, CLAIM_IDLE_S, SUPERVISE_S, REBALANCE_S = 0.3, 1.5, 1.5, 0.1, 0.5
#: Issue 29's bound on a stream's longest wait around a worker joining or leaving.
WAIT_BOUND_S = 1.0
#: A frame every 50 ms per stream (20 fps in; each demo worker makes ~20-30 frames/s here).
PERIOD_S = 0.05
STREAM_COLOURS = [("red", "white"), ("yellow", "blue"), ("cyan", "black"), ("purple", "green")]
RADIUS, GRID, CENTROID_TOL_PX = 8.0, (18.0, 32.0, 46.0), 5.0


def _cell(seq: int) -> tuple[float, float]:
    """Where frame ``seq``'s circle is: cell ``seq mod 9`` of the grid (x first)."""
    return GRID[seq % 3], GRID[(seq // 3) % 3]


def _shows(image: np.ndarray, colour: str, background: str, centre: tuple[float, float]) -> bool:
    """Whether ``image`` reads as a ``colour`` shape on ``background`` centred near ``centre``."""
    r = read_image(image)
    return (r.colour, r.background) == (colour, background) and r.centroid is not None and \
        float(np.hypot(*np.subtract(r.centroid, centre))) <= CENTROID_TOL_PX


class ShapeLog(FrameLog):
    """A stream's outputs (``FrameLog``'s judge) with demo-model frames: see the module docstring."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.colour, self.background = STREAM_COLOURS[k]
        self.config = StreamConfig(prompt=caption_for("circle", self.colour, self.background),
                                   width=SIZE, height=SIZE, strength=0.5)

    def frame(self, seq: int) -> np.ndarray:
        return render(ShapeSpec("circle", self.colour, self.background, *_cell(seq), RADIUS, SIZE))

    def is_frame(self, seq: int, image: np.ndarray) -> bool:
        return _shows(image, self.colour, self.background, _cell(seq))

    def longest_wait(self, since: float, until: float) -> float:
        """The longest time without an output over ``[since, until]``, counted from the last output
        before ``since`` (a wait that began before the event counts whole) to ``until``."""
        before = [t for t, _s, _own in self.got if t <= since]
        times = before[-1:] + [t for t, _s, _own in self.got if since < t <= until] + [until]
        return max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else until - since


def _job_colours(i: int) -> tuple[str, str]:
    """Job ``i``'s colour pair: 56 distinct pairs, so no two of the 30 jobs share one."""
    colour = COLOUR_NAMES[i % len(COLOUR_NAMES)]
    others = [c for c in COLOUR_NAMES if c != colour]
    return colour, others[(i // len(COLOUR_NAMES)) % len(others)]


def _submit_jobs(gw: RedisGatewayRunner) -> list[tuple[int, Future]]:
    jobs = []
    for i in range(N_JOBS):
        colour, background = _job_colours(i)
        img = render(ShapeSpec("circle", colour, background, *_cell(i), RADIUS, SIZE))
        cfg = StreamConfig(mode="img2img", prompt=caption_for("circle", colour, background), width=SIZE,
                           height=SIZE, strength=0.5)
        jobs.append((i, gw.submit_job(cfg, img)))
    return jobs


def _job_report(jobs: list[tuple[int, Future]]) -> dict[str, Any]:
    wait([f for _i, f in jobs], timeout=60)
    ok, lost, wrong = 0, [], []
    for i, f in jobs:
        if not f.done() or f.exception() is not None:
            lost.append((i, repr(f.exception()) if f.done() else "pending"))
        elif not _shows(f.result().image, *_job_colours(i), _cell(i)):
            wrong.append((i, read_image(f.result().image)))
        else:
            ok += 1
    return {"answered_once": ok, "lost": lost, "foreign": wrong}


#: The joining worker's Redis user: created disabled, enabled when the test lets the worker join.
JOINER_USER, JOINER_PASSWORD = "w2", "w2-secret"


@contextlib.contextmanager
def _fleet(tmp_path: Path) -> Iterator[tuple[RedisServer, list[WorkerProcess]]]:
    """A private ``redis-server`` and three demo-model workers (``-v``: a log line per job answer, read
    by ``judge_workers``), all started; the third logs in as a Redis user that is disabled until the
    test enables it (``_let_join``).

    Why: a demo worker's start-up (mostly imports) costs 15-50 s of CPU on the shared 2-core box,
    too long to pay twice in a row. So the joining worker starts with the others and joins the
    fleet when it may log in: its first heartbeat, as a freshly started worker's. Until then every
    login fails (``AuthenticationError``, a ``ConnectionError``) and its loops back off, as they do
    whenever Redis is unreachable; then it talks to Redis directly, as the others do."""
    if redis_server_binary() is None:
        pytest.fail("redis-server is required (apt-get install -y redis-server)", pytrace=False)
    server = RedisServer(log_dir=tmp_path).start()
    with redis.Redis.from_url(server.url) as r:
        r.acl_setuser(JOINER_USER, enabled=False, passwords=[f"+{JOINER_PASSWORD}"], keys=["*"],
                      channels=["*"], commands=["+@all"])
    urls = [server.url, server.url, f"redis://{JOINER_USER}:{JOINER_PASSWORD}@127.0.0.1:{server.port}/0"]
    workers = [WorkerProcess(url, "--model", "demo", "--device", "cpu", "--threads", "1", "--max-jobs", "2",
                             "--heartbeat-s", str(HEARTBEAT_S), "--ttl-s", str(TTL_S), "--claim-idle-s",
                             str(CLAIM_IDLE_S), worker_id=f"w{n}", log=tmp_path / f"w{n}.log")
               for n, url in enumerate(urls)]
    for w in workers:
        w.cmd.insert(w.cmd.index("worker"), "-v")
        w.start()
    try:
        yield server, workers
    finally:
        for w in workers:  # the test is over (the drained worker's exit was waited for): no need to wait twice more
            w.kill()
        server.stop()


def _let_join(r: redis.Redis) -> None:
    """Enable the joining worker's Redis user: its next login succeeds."""
    r.acl_setuser(JOINER_USER, enabled=True, passwords=[f"+{JOINER_PASSWORD}"], keys=["*"], channels=["*"],
                  commands=["+@all"])


def test_rolling_update_of_the_workers(tmp_path: Path):
    t_start = time.monotonic()
    with _fleet(tmp_path) as (server, workers):
        scfg = ScaleConfig(redis_url=server.url, heartbeat_s=HEARTBEAT_S, worker_ttl_s=TTL_S,
                           claim_idle_s=CLAIM_IDLE_S, supervise_s=SUPERVISE_S, max_jobs=2, rebalance_s=REBALANCE_S)
        gw = RedisGatewayRunner(scfg, EngineConfig(output_queue_size=64), job_timeout_s=60).start()
        r = redis.Redis.from_url(server.url)
        streams: list[Stream] = []
        try:
            try:
                wait_for(lambda: len(gw.workers) == 2, 90, what="2 workers beating")
                wait_for(lambda: "ditstream worker w2:" in workers[2].log_tail(), 90, what="w2 started")
            except TimeoutError:
                raise AssertionError("\n".join(w.log_tail(2000) for w in workers)) from None
            logs = [ShapeLog(k) for k in range(N_STREAMS)]
            streams = [Stream(gw, log, log.config, PERIOD_S) for log in logs]
            wait_for(lambda: all(len(g.got) >= 3 for g in logs), 30, what="outputs flowing")
            t_flowing = time.monotonic()

            # ---- a third worker joins: the gateway moves a session onto it (both ends alive)
            _let_join(r)
            wait_for(lambda: "w2" in gw.workers, 90, what="w2 beating")
            t_join = time.monotonic()
            wait_for(lambda: any(s.h.worker == "w2" for s in streams), 10, interval=0.02,
                     what="a session moved to w2")
            wait_for(lambda: all(g.since(time.monotonic() - 0.5) >= 2 for g in logs), 10, what="streams flowing")
            t_joined = time.monotonic()

            # ---- the first worker is told to stop while it holds jobs and sessions
            jobs = _submit_jobs(gw)

            def holding() -> bool:
                held = {c["name"].decode(): c["pending"] for c in r.xpending(scfg.keys.jobs, scfg.keys.group)["consumers"]}
                return held.get("w0", 0) > 0

            wait_for(holding, 20, interval=0.005, what="w0 holding jobs")
            on_w0 = sum(1 for s in streams if s.h.worker == "w0")
            in_flight = sum(1 for _i, f in jobs if not f.done())
            assert workers[0].proc is not None
            workers[0].proc.send_signal(signal.SIGTERM)
            t_term = time.monotonic()
            job_report = _job_report(jobs)
            wait_for(lambda: all(g.since(t_term) >= 10 for g in logs), 20, what="every stream going on")
            t_end = time.monotonic()
            exit_code = workers[0].proc.wait(30)
            exited_s = time.monotonic() - t_term
            placement = sorted(s.h.worker for s in streams)
            counters = gw.counters
        finally:
            for s in streams:
                s.close()
            gw.stop()
            r.close()
    runtime_s = time.monotonic() - t_start
    judged = judge_workers(workers)
    waits_join = [g.longest_wait(t_join, t_joined) for g in logs]
    waits_term = [g.longest_wait(t_term, t_end) for g in logs]
    history = [g.report(t_flowing, t_end) for g in logs]
    print(f"\nrolling update: fleet up and streams flowing {t_flowing - t_start:.1f} s; w2 joined {t_join - t_flowing:.1f} s after the streams began, moved "
          f"{counters['sessions_rebalanced']} session(s); SIGTERM on w0 holding {on_w0} session(s) and jobs "
          f"({in_flight}/{N_JOBS} in flight): exit {exit_code} after {exited_s:.2f} s, sessions now on {placement}")
    print(f"  longest wait per stream: join {[round(w, 2) for w in waits_join]} s, SIGTERM "
          f"{[round(w, 2) for w in waits_term]} s; frames {[h['history'] for h in history]}, duplicated "
          f"{sum(h['duplicated'] for h in history)}, out of order {sum(h['out_of_order'] for h in history)}, "
          f"foreign {sum(h['foreign'] for h in history)}")
    print(f"  jobs: answered once {job_report['answered_once']}, lost {job_report['lost']}, foreign "
          f"{job_report['foreign']}; workers: {judged['answered']} answered, {judged['computed']} computed; "
          f"runtime {runtime_s:.1f} s")

    assert exit_code == 0, workers[0].log_tail(2000)
    assert on_w0 >= 1 and in_flight >= N_JOBS // 2, "w0 held too little at the SIGTERM to prove anything"
    assert counters["sessions_rebalanced"] >= 1
    assert (job_report["answered_once"], job_report["lost"], job_report["foreign"]) == (N_JOBS, [], []), job_report
    assert not judged["jobs_computed_twice"] and not judged["answered_twice"], judged
    assert judged["answered"] == N_JOBS, judged
    for k, h in enumerate(history):
        assert (h["duplicated"], h["out_of_order"], h["foreign"]) == (0, 0, 0), f"stream {k}: {h}"
    sessions = "\n".join(line for w in workers if w.log is not None
                         for line in w.log.read_text(errors="replace").splitlines() if ": session " in line)
    assert max(waits_join) <= WAIT_BOUND_S, f"a stream waited {max(waits_join):.2f} s around the join:\n{sessions}"
    assert max(waits_term) <= WAIT_BOUND_S, f"a stream waited {max(waits_term):.2f} s around the SIGTERM:\n{sessions}"
