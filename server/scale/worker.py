"""``ditstream worker``: an engine that takes REST jobs and pinned streams from Redis.

This module holds the worker's state, lifecycle and heartbeat; ``worker_jobs.py`` its jobs,
``worker_sessions.py`` its live sessions, ``worker_state.py`` what it keeps per job and session.

Four threads around one ``EngineRunner`` (the same runner and core as the all-in-one server):

- **jobs**: ``XREADGROUP`` on the jobs stream, never holding more than ``max_jobs``; each job is
  checked (deadline, already answered, attempts) and handed to the engine, where it is batched
  with the live streams.
- **answers**: finished jobs are answered by one Lua script — ``SET done:<job> NX``, and only if
  that succeeded ``XADD`` the result to the gateway's reply stream — then ``XACK`` + ``XDEL``. So
  a job that two workers ran (a slow worker taken for dead) is still answered exactly once.
- **sessions**: one ``XREAD`` over this worker's control stream and the input stream of every
  session pinned here; only the newest frame of each session is submitted (latest wins).
  Outputs go back on the session's bounded output stream.
- **heartbeat**: ``SET worker:<id> <Heartbeat> PX ttl``; re-claims its own in-flight jobs (so
  their idle time never reaches the claim threshold); runs the janitor, which ``XAUTOCLAIM``\\ s
  jobs idle past ``claim_idle_s`` (their worker died) even when busy (up to ``max_jobs`` extra)
  and sends jobs delivered ``max_attempts`` times to the dead-letter stream; drops sessions that
  were re-pinned elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any

from ditstream.engine.errors import EngineDeadError
from ditstream.engine.runner import EngineRunner
from ditstream.server.scale.config import (
    Backoff,
    ScaleConfig,
    connect,
    is_nogroup,
    redact,
    sid_str,
)
from ditstream.server.scale.messages import (
    Heartbeat,
    SessionRecord,
    SessionReply,
)
from ditstream.server.scale.worker_jobs import WorkerJobs
from ditstream.server.scale.worker_sessions import WorkerSessions
from ditstream.server.scale.worker_state import ANSWER_LUA, WorkerJob, WorkerSession

logger = logging.getLogger(__name__)








class Worker(WorkerJobs, WorkerSessions):
    """Runs ``runner`` for a Redis-connected fleet. ``start()`` then ``wait()``; ``stop()`` to leave."""

    def __init__(self, runner: EngineRunner, cfg: ScaleConfig, worker_id: str | None = None) -> None:
        self.runner = runner
        self.cfg = cfg
        #: Images on the wire over this many pixels are refused from their header (the engine's limit).
        self.max_pixels: int = runner.core.config.max_pixels
        self.keys = cfg.keys
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.r = connect(cfg.redis_url)
        self.started = time.time()
        self._stop = threading.Event()
        #: Set when leaving: take no new work, stop beating, finish (answer) the jobs held.
        self._leaving = threading.Event()
        self._threads: list[threading.Thread] = []
        self._jobs: dict[str, WorkerJob] = {}
        self._jobs_lock = threading.Lock()
        self._finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._room = threading.Event()
        #: Jobs reserved by the jobs loop's read and by the janitor's claim while they run (under
        #: ``_jobs_lock``): each leaves room for the other's, so together they never exceed the bound.
        self._reading = 0
        self._claiming = 0
        self._sessions: dict[str, WorkerSession] = {}
        self._sessions_lock = threading.Lock()
        self._out_wake = threading.Event()
        self._replies: queue.SimpleQueue[tuple[str, SessionReply]] = queue.SimpleQueue()
        self._answer = self.r.register_script(ANSWER_LUA)
        self._ctl_last = "0-0"
        self._claim_cursor = "0-0"
        self._gateways_missing: set[str] = set()
        self.counters: dict[str, float] = {k: 0 for k in (
            "jobs_done", "jobs_failed", "jobs_expired", "jobs_duplicate", "jobs_claimed", "jobs_dead_lettered",
            "jobs_retried", "jobs_orphaned", "frames_in", "frames_out", "frames_stale", "sessions_opened", "inference_s")}
        self.error: BaseException | None = None
    def start(self) -> Worker:
        self.runner.start()
        self.runner.check_alive()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._jobs_loop, "jobs"),
                             (self._answers_loop, "answers"), (self._sessions_loop, "sessions"),
                             (self._outputs_loop, "outputs")):
            t = threading.Thread(target=self._guard(target), name=f"ditstream-worker-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("worker %s on %s: model %s", self.id, redact(self.cfg.redis_url), self.runner.info.get("model"))
        return self

    def _guard(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a loop bug must stop the worker, not leave a zombie
                logger.exception("worker loop %s died", target.__name__)
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
        while self.error is None and self._jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._jobs:
            logger.warning("worker %s: leaving %d job(s) unanswered for another worker", self.id, len(self._jobs))
        self._stop.set()
        self._room.set()
        self._out_wake.set()
        for t in self._threads:
            t.join(timeout)
        with contextlib.suppress(Exception):
            self.r.delete(self.keys.worker(self.id), self.keys.worker_control(self.id))
            self.r.srem(self.keys.workers, self.id)
        with self._sessions_lock:
            for s in self._sessions.values():
                s.handle.close()
            self._sessions.clear()
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
        with self._jobs_lock:
            inflight = len(self._jobs)
        info = {k: v for k, v in self.runner.info.items() if k in (
            "model", "backend", "device", "dtype", "size_multiple", "defaults", "loras")}
        return Heartbeat(worker=self.id, host=socket.gethostname(), pid=os.getpid(), started=self.started,
                         engine_alive=self.runner.alive, info=info, sessions=len(self._sessions),
                         jobs_inflight=inflight, max_jobs=self.cfg.max_jobs, counters=dict(self.counters))

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
                    self._touch_jobs()
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
                self._touch_jobs()
                self._reap_orphans()
                self._janitor()
                if time.monotonic() - last_check > self.cfg.heartbeat_s * 2:
                    self._drop_foreign_sessions()
                    last_check = time.monotonic()
                backoff.ok()
            except self._conn_errors() as exc:
                backoff.failed(exc)
                continue
            self._stop.wait(self.cfg.heartbeat_s)

    @staticmethod
    def _conn_errors() -> tuple[type[BaseException], ...]:
        import redis

        return (redis.ConnectionError, redis.TimeoutError)

    def _touch_jobs(self) -> None:
        """Reset the idle time of the jobs we hold, so no janitor takes a slow job for a dead one."""
        with self._jobs_lock:
            ids = list(self._jobs)
        if ids:
            try:
                self.r.xclaim(self.keys.jobs, self.keys.group, self.id, 0, ids, justid=True)
            except Exception as exc:  # NOGROUP after a restart: the jobs loop recreates it
                if not is_nogroup(exc):
                    raise

    def _janitor(self) -> None:
        """XAUTOCLAIM jobs of dead workers, even when busy: up to ``max_jobs`` beyond our own ``max_jobs``.

        So a dead worker's jobs are taken within ``claim_idle_s`` plus one beat however busy the
        survivors are. It cannot overload: a worker holds at most ``2 * max_jobs`` (the jobs loop
        reads new jobs only below ``max_jobs``, so the extra ones are a one-off that drains), the
        engine batches them with the rest, and what one survivor cannot take the next beat's (or
        another survivor's) janitor does.
        """
        import redis

        with self._jobs_lock:
            room = 2 * self.cfg.max_jobs - len(self._jobs) - self._reading
            if room <= 0:
                return
            self._claiming = room  # the jobs loop leaves room for these until they are taken
        try:
            try:
                res = self.r.xautoclaim(self.keys.jobs, self.keys.group, self.id,
                                        min_idle_time=int(self.cfg.claim_idle_s * 1e3), start_id=self._claim_cursor,
                                        count=room)
            except redis.ResponseError as exc:
                if is_nogroup(exc):
                    self._claim_cursor = "0-0"
                    return
                raise
            # XAUTOCLAIM scans a bounded slice of the pending list per call: resume where it stopped.
            self._claim_cursor = sid_str(res[0]) if res and res[0] else "0-0"
            for entry_id, fields in res[1]:
                if not fields:  # deleted under us
                    continue
                eid = sid_str(entry_id)
                pend = self.r.xpending_range(self.keys.jobs, self.keys.group, min=eid, max=eid, count=1)
                deliveries = int(pend[0]["times_delivered"]) if pend else 2
                self.counters["jobs_claimed"] += 1
                logger.info("worker %s claimed job entry %s (delivery %d) from a dead worker", self.id, eid,
                            deliveries)
                self._take_job(eid, fields, deliveries)
        finally:
            with self._jobs_lock:
                self._claiming = 0

    def _drop_foreign_sessions(self) -> None:
        """Close sessions whose record moved to another worker (we were taken for dead) or vanished."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        if not sessions:
            return
        raws = self.r.mget([self.keys.session(s.sid) for s in sessions])
        recs: list[SessionRecord | None] = []
        for raw in raws:
            rec = None
            with contextlib.suppress(Exception):
                rec = SessionRecord.load(raw) if raw is not None else None
            recs.append(rec)
        gws = sorted({rec.gateway for rec in recs if rec is not None and rec.gateway})
        up = dict(zip(gws, self.r.mget([self.keys.gateway(g) for g in gws]))) if gws else {}
        for s, rec in zip(sessions, recs):
            # Ours, of our epoch or older, and its gateway alive (a dead gateway's sessions end now).
            keep = (rec is not None and rec.worker == self.id and rec.epoch <= s.epoch
                    and up.get(rec.gateway) is not None)
            if not keep:
                logger.info("worker %s: session %s is no longer pinned here; closing it", self.id, s.sid)
                self._close_session(s.sid)










