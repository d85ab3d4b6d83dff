"""``ditstream worker``: an engine that takes REST jobs and pinned streams from Redis.

``Worker`` owns one ``EngineRunner`` (the same runner and core as the all-in-one server) and wires
the parts around it, each with its own state:

- ``WorkerJobs`` (``worker_jobs.py``): the jobs it holds. Thread **jobs**: ``XREADGROUP`` on the
  jobs stream, never holding more than ``max_jobs``; each job is checked (deadline, already
  answered, attempts) and handed to the engine, where it is batched with the live streams. Thread
  **answers**: each finished job is settled by ``JobAnswers`` (``worker_answers.py``): answered by
  one Lua script — ``SET done:<job> NX``, and only if that succeeded ``XADD`` the result to the
  gateway's reply stream — then ``XACK`` + ``XDEL``. So a job that two workers ran (a slow worker
  taken for dead) is still answered exactly once.
- ``WorkerSessions`` (``worker_sessions.py``): the sessions pinned here. Thread **sessions**: one
  ``XREAD`` over this worker's control stream and the input stream of every session pinned here;
  only the newest frame of each session is submitted (latest wins).
- ``WorkerOutputs`` (``worker_outputs.py``): thread **outputs** ships outputs and control replies
  on the sessions' bounded output streams, woken by the engine.
- Thread **heartbeat** (here): ``SET worker:<id> <Heartbeat> PX ttl``; re-claims its own in-flight
  jobs (so their idle time never reaches the claim threshold); runs the janitor, which
  ``XAUTOCLAIM``\\ s jobs idle past ``claim_idle_s`` (their worker died) even when busy (up to
  ``max_jobs`` extra) and sends jobs delivered ``max_attempts`` times to the dead-letter stream;
  drops sessions that were re-pinned elsewhere.

Five threads in all; ``Counters`` holds every event count, bumped from any of them under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ditstream.engine.errors import EngineDeadError
from ditstream.engine.runner import EngineRunner
from ditstream.server.scale.config import Backoff, ScaleConfig, conn_errors
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.messages import Heartbeat
from ditstream.server.scale.redis_conn import connect, redact
from ditstream.server.scale.worker_answers import JobAnswers
from ditstream.server.scale.worker_jobs import WorkerJobs
from ditstream.server.scale.worker_outputs import WorkerOutputs
from ditstream.server.scale.worker_sessions import WorkerSessions

logger = logging.getLogger(__name__)

#: Every event a worker counts (sent in its heartbeat; ``ditstream_worker_*`` on the gateway's /metrics).
WORKER_COUNTERS = (
    "jobs_done", "jobs_failed", "jobs_expired", "jobs_duplicate", "jobs_claimed", "jobs_dead_lettered",
    "jobs_retried", "jobs_orphaned", "frames_in", "frames_out", "frames_stale", "sessions_opened", "inference_s")


class Worker:
    """Runs ``runner`` for a Redis-connected fleet. ``start()`` then ``wait()``; ``stop()`` to leave."""

    def __init__(self, runner: EngineRunner, cfg: ScaleConfig, worker_id: str | None = None) -> None:
        self.runner = runner
        self.cfg = cfg
        #: Images on the wire over this many pixels are refused from their header (the engine's limit).
        self.max_pixels: int = runner.core.config.max_pixels
        self.keys = cfg.keys
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.r = connect(cfg.redis)
        self.started = time.time()
        self._stop = threading.Event()
        #: Set when leaving: take no new work, stop beating, finish (answer) the jobs held.
        self._leaving = threading.Event()
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        self.counters = Counters(WORKER_COUNTERS)
        self.answers = JobAnswers(self.r, cfg, self.id, self.counters)
        self.jobs = WorkerJobs(self.r, cfg, self.id, runner, self.answers, self.counters, self._stop,
                               taking=lambda: not self._leaving.is_set() and self.warm, max_pixels=self.max_pixels)
        self.outputs = WorkerOutputs(self.r, cfg, self.id, self.counters, self._stop)
        self.sessions = WorkerSessions(self.r, cfg, self.id, runner, self.outputs, self.counters, self._stop,
                                       max_pixels=self.max_pixels)

    def start(self) -> Worker:
        self.runner.start()
        self.runner.check_alive()
        loops: tuple[tuple[Callable[[], None], str], ...] = (
            (self._heartbeat_loop, "heartbeat"), (self.jobs.loop, "jobs"), (self.jobs.answers_loop, "answers"),
            (self.sessions.loop, "sessions"), (lambda: self.outputs.loop(self.sessions.snapshot), "outputs"))
        for target, name in loops:
            t = threading.Thread(target=self._guard(target, name), name=f"ditstream-worker-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("worker %s on %s: model %s", self.id, redact(self.cfg.redis_url), self.runner.info.get("model"))
        return self

    def _guard(self, target: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a loop bug must stop the worker, not leave a zombie
                logger.exception("worker loop %s died", name)
                self.error = exc
                self._leaving.set()
                self._stop.set()
        return run

    def wait(self, timeout: float | None = None) -> bool:
        """Block until asked to leave (``request_stop``, a signal) or the engine died; True if so."""
        return self._leaving.wait(timeout)

    def request_stop(self) -> None:
        """Safe from a signal handler: ``wait()`` returns, then the owner calls ``stop()``."""
        self._leaving.set()

    def stop(self, timeout: float = 5.0, drain_s: float = 10.0) -> None:
        """Leave cleanly: take no new work, drop the heartbeat (sessions re-pin at once), answer the
        jobs already held (up to ``drain_s``), then stop the engine.

        Jobs still held after ``drain_s`` are left un-acknowledged: another worker's janitor claims them.
        """
        self._leaving.set()
        with contextlib.suppress(Exception):
            self.r.delete(self.keys.worker(self.id))
            self.r.srem(self.keys.workers, self.id)
        deadline = time.monotonic() + drain_s
        while self.error is None and self.jobs.held() and time.monotonic() < deadline:
            time.sleep(0.05)
        if held := self.jobs.held():
            logger.warning("worker %s: leaving %d job(s) unanswered for another worker", self.id, held)
        self._stop.set()
        self.jobs.wake()
        self.outputs.wake()
        for t in self._threads:
            t.join(timeout)
        with contextlib.suppress(Exception):
            self.r.delete(self.keys.worker(self.id), self.keys.worker_control(self.id))
            self.r.srem(self.keys.workers, self.id)
        self.sessions.close_all()
        self.runner.stop()
        with contextlib.suppress(Exception):
            self.r.close()

    @property
    def warm(self) -> bool:
        """The engine has warmed every shape (``EngineRunner.ready``); until then the worker stays
        out of the fleet: no heartbeat in Redis, no jobs claimed, ``/health`` 503 "warming"."""
        return self.runner.ready

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(ok, body)`` of the worker's ``/health``: ok once warm, alive and not leaving."""
        hb = self.heartbeat()
        ok = hb.engine_alive and self.warm and not self.stopping
        status = "ok" if ok else ("warming" if hb.engine_alive and not self.warm and not self.stopping else "down")
        body: dict[str, Any] = {"status": status, **hb.model_dump(exclude={"counters"})}
        if status == "warming":
            body["warming"] = list(self.runner.warming)
        return ok, body

    @property
    def stopping(self) -> bool:
        return self._leaving.is_set()

    def heartbeat(self) -> Heartbeat:
        inflight = self.jobs.held()
        info = {k: v for k, v in self.runner.info.items() if k in (
            "model", "backend", "device", "dtype", "size_multiple", "defaults", "loras", "limits")}
        info["stream_capacity"] = self.cfg.stream_capacity  # in ``info``: a gateway of an older release ignores it
        return Heartbeat(worker=self.id, host=socket.gethostname(), pid=os.getpid(), started=self.started,
                         engine_alive=self.runner.alive, info=info, limits=self.runner.limits,
                         sessions=self.sessions.count(),
                         jobs_inflight=inflight, max_jobs=self.cfg.max_jobs, counters=self.counters.snapshot())

    def _heartbeat_loop(self) -> None:
        backoff = Backoff(f"worker {self.id} heartbeat", self._stop)
        last_check = 0.0
        while not self._stop.is_set():
            if not self.runner.alive:
                logger.error("worker %s: the engine died (%r); leaving", self.id, self.runner.error)
                self.error = self.runner.error or EngineDeadError("the engine stopped")
                self._leaving.set()
                self._stop.set()
                return
            try:
                if self._leaving.is_set():  # draining: keep our jobs ours, but no heartbeat, no claims
                    self.jobs.touch()
                    backoff.ok()
                    self._stop.wait(self.cfg.heartbeat_s)
                    continue
                if not self.warm:  # not in the fleet until warm: no sessions are pinned here, no claims
                    self._stop.wait(min(self.cfg.heartbeat_s, 0.2))
                    continue
                hb = self.heartbeat()
                pipe = self.r.pipeline(transaction=False)
                pipe.set(self.keys.worker(self.id), hb.dump(), px=int(self.cfg.worker_ttl_s * 1e3))
                pipe.sadd(self.keys.workers, self.id)
                pipe.execute()
                self.jobs.touch()
                self.jobs.reap_orphans()
                self.jobs.janitor()
                if time.monotonic() - last_check > self.cfg.heartbeat_s * 2:
                    self.sessions.drop_foreign()
                    last_check = time.monotonic()
                backoff.ok()
            except conn_errors() as exc:
                backoff.failed(exc)
                continue
            self._stop.wait(self.cfg.heartbeat_s)
