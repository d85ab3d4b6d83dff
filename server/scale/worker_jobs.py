"""The REST jobs a worker holds: taking them from the jobs stream, watching them run, handing each
finished one to ``JobAnswers``.

Two threads run here: **jobs** (``XREADGROUP``, never holding more than ``max_jobs``) and
**answers** (settles each finished job). The heartbeat thread calls ``touch``, ``reap_orphans`` and
``janitor`` once per beat. The held jobs and the room bookkeeping are this object's, under its lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ditstream.engine.errors import DitstreamError, ValidationError
from ditstream.engine.runner import EngineRunner
from ditstream.server.scale.config import (
    Backoff,
    ScaleConfig,
    conn_errors,
    ensure_group,
    fields_get,
    is_nogroup,
    sid_str,
)
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.messages import JobMessage, WireError, config_from_wire, decode_image
from ditstream.server.scale.worker_answers import JobAnswers

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)


@dataclass
class WorkerJob:
    """A job this worker holds: its stream entry, message, engine future and attempt number."""

    entry: str
    msg: JobMessage
    future: Future
    attempts: int


class WorkerJobs:
    """Jobs taken from the stream and running in the engine, until answered."""

    def __init__(self, r: redis.Redis, cfg: ScaleConfig, worker_id: str, runner: EngineRunner, answers: JobAnswers,
                 counters: Counters, stop: threading.Event, *, taking: Callable[[], bool], max_pixels: int) -> None:
        self.r = r
        self.cfg = cfg
        self.keys = cfg.keys
        self.id = worker_id
        self.runner = runner
        self.answers = answers
        self.counters = counters
        self.max_pixels = max_pixels
        #: Whether to take new jobs now (warm and not leaving).
        self.taking = taking
        self._stop = stop
        self._lock = threading.Lock()
        self._jobs: dict[str, WorkerJob] = {}
        self._finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._room = threading.Event()
        #: Jobs reserved by the jobs loop's read and by the janitor's claim while they run (under
        #: ``_lock``): each leaves room for the other's, so together they never exceed the bound.
        self._reading = 0
        self._claiming = 0
        self._claim_cursor = "0-0"
        self._gateways_missing: set[str] = set()

    def held(self) -> int:
        """Jobs held now (running or waiting to be answered)."""
        with self._lock:
            return len(self._jobs)

    def wake(self) -> None:
        """Stop waiting for room (the worker stops)."""
        self._room.set()

    def loop(self) -> None:
        """The jobs thread: read new jobs while there is room."""
        import redis

        backoff = Backoff(f"worker {self.id} jobs", self._stop)
        need_group = True
        while not self._stop.is_set():
            try:
                if need_group:
                    ensure_group(self.r, self.keys)
                    need_group = False
                # Warming or leaving: claim nothing (another worker, or this one once warm, takes the job).
                busy = not self.taking()
                with self._lock:
                    room = 0 if busy else self.cfg.max_jobs - len(self._jobs) - self._claiming
                    self._reading = max(room, 0)  # the janitor leaves room for these
                if room <= 0:
                    self._room.wait(0.2)
                    self._room.clear()
                    continue
                try:
                    resp = self.r.xreadgroup(self.keys.group, self.id, {self.keys.jobs: ">"}, count=room, block=500)
                    backoff.ok()
                    for _stream, entries in resp or ():
                        for entry_id, fields in entries:
                            self._take(sid_str(entry_id), fields, 1)
                finally:
                    with self._lock:
                        self._reading = 0
            except redis.ResponseError as exc:
                if is_nogroup(exc):
                    need_group = True
                    logger.warning("worker %s: the consumer group is gone (Redis restarted?); recreating", self.id)
                    continue
                raise
            except conn_errors() as exc:
                need_group = True
                backoff.failed(exc)

    def _take(self, eid: str, fields: dict[Any, Any], deliveries: int) -> None:
        """Check one delivered job and hand it to the engine (or answer/drop it right away)."""
        raw = fields_get(fields, "m")
        try:
            msg = JobMessage.load(raw or b"")
        except Exception as exc:
            logger.error("worker %s: unreadable job entry %s: %s", self.id, eid, exc)
            self.answers.dead_letter(eid, fields, f"unreadable: {exc}", None)
            return
        attempts = msg.attempt + deliveries - 1
        if time.time() > msg.deadline:
            self.counters.add("jobs_expired")
            logger.info("worker %s: job %s expired before it ran; dropped", self.id, msg.job)
            self.answers.ack(eid)
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(self.keys.done(msg.job))
        pipe.exists(self.keys.gateway(msg.gateway) if msg.gateway else self.keys.done(msg.job))
        answered, gateway_up = pipe.execute()
        if answered:
            self.counters.add("jobs_duplicate")
            self.answers.ack(eid)
            return
        if msg.gateway and not gateway_up:  # nobody waits for it: drop it unrun
            self.counters.add("jobs_orphaned")
            logger.info("worker %s: job %s belongs to gateway %s, which is gone; dropped", self.id, msg.job,
                        msg.gateway)
            self.answers.ack(eid)
            return
        if attempts > self.cfg.max_attempts:
            self.answers.dead_letter(eid, fields, f"delivered {attempts} times (limit {self.cfg.max_attempts})", msg)
            return
        try:
            image = decode_image(msg.image, fields_get(fields, "img") or b"",
                                 max_pixels=self.max_pixels) if msg.image else None
            future = self.runner.submit_job(config_from_wire(msg.config), image)
        except (DitstreamError, WireError, TypeError, ValueError) as exc:
            err = exc if isinstance(exc, DitstreamError) else ValidationError(f"bad job: {exc}")
            self.counters.add("jobs_failed")
            self.answers.reply(eid, msg, None, err)
            return
        with self._lock:
            self._jobs[eid] = WorkerJob(eid, msg, future, attempts)
        future.add_done_callback(lambda _f: self._finished.put(eid))

    def answers_loop(self) -> None:
        """The answers thread: settle each finished job; retry an answer that Redis refused."""
        backoff = Backoff(f"worker {self.id} answers", self._stop)
        retry: list[str] = []
        while not self._stop.is_set():
            if retry:
                eid = retry.pop(0)
            else:
                try:
                    eid = self._finished.get(timeout=0.2)
                except queue.Empty:
                    continue
            with self._lock:
                job = self._jobs.get(eid)
            if job is None:
                continue
            try:
                self.answers.finish(job)
                backoff.ok()
            except conn_errors() as exc:
                if time.time() < job.msg.deadline:
                    retry.append(eid)  # answer once Redis is back
                    backoff.failed(exc)
                    continue
            with self._lock:
                self._jobs.pop(eid, None)
            self._room.set()

    def touch(self) -> None:
        """Reset the idle time of the jobs we hold, so no janitor takes a slow job for a dead one."""
        with self._lock:
            ids = list(self._jobs)
        if ids:
            try:
                self.r.xclaim(self.keys.jobs, self.keys.group, self.id, 0, ids, justid=True)
            except Exception as exc:  # NOGROUP after a restart: the jobs loop recreates it
                if not is_nogroup(exc):
                    raise

    def reap_orphans(self) -> None:
        """Cancel held jobs nobody waits for: past their deadline, answered or cancelled elsewhere, or
        whose gateway's liveness key has been gone for two beats running (one miss may be a Redis
        restart the gateway has not yet noticed). The engine drops a cancelled job, run or not."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if not j.future.done()]
        if not jobs:
            self._gateways_missing = set()
            return
        gws = sorted({j.msg.gateway for j in jobs if j.msg.gateway})
        pipe = self.r.pipeline(transaction=False)
        pipe.mget([self.keys.done(j.msg.job) for j in jobs])
        pipe.mget([self.keys.gateway(g) for g in gws] or [self.keys.gateway("-")])
        done, up = pipe.execute()
        gone = {g for g, v in zip(gws, up) if v is None}
        dead, self._gateways_missing = gone & self._gateways_missing, gone
        now = time.time()
        for j, mark in zip(jobs, done):
            why = ("its deadline passed" if now > j.msg.deadline else "it was answered or cancelled"
                   if mark is not None else "its gateway is gone" if j.msg.gateway in dead else "")
            if why and j.future.cancel():
                self.counters.add("jobs_orphaned")
                logger.info("worker %s: job %s cancelled: %s", self.id, j.msg.job, why)

    def janitor(self) -> None:
        """XAUTOCLAIM jobs of dead workers, even when busy: up to ``max_jobs`` beyond our own ``max_jobs``.

        So a dead worker's jobs are taken within ``claim_idle_s`` plus one beat however busy the
        survivors are. It cannot overload: a worker holds at most ``2 * max_jobs`` (the jobs loop
        reads new jobs only below ``max_jobs``, so the extra ones are a one-off that drains), the
        engine batches them with the rest, and what one survivor cannot take the next beat's (or
        another survivor's) janitor does.
        """
        import redis

        with self._lock:
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
                self.counters.add("jobs_claimed")
                logger.info("worker %s claimed job entry %s (delivery %d) from a dead worker", self.id, eid,
                            deliveries)
                self._take(eid, fields, deliveries)
        finally:
            with self._lock:
                self._claiming = 0
