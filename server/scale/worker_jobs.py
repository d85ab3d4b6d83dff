"""REST jobs on a worker: taking them from the jobs stream, answering each exactly once, the
dead-letter stream; a mixin of ``Worker`` (see ``worker.py`` for the threads)."""

from __future__ import annotations

import logging
import queue
import time
from typing import Any

from ditstream.engine.errors import DitstreamError, GenerationError, ValidationError
from ditstream.engine.types import StreamOutput
from ditstream.server.scale.config import (
    Backoff,
    ensure_group,
    fields_get,
    is_nogroup,
    sid_str,
)
from ditstream.server.scale.messages import (
    ErrorInfo,
    JobMessage,
    JobResult,
    WireError,
    config_from_wire,
    decode_image,
    encode_image,
)
from ditstream.server.scale.worker_state import RETRYABLE, WorkerJob

logger = logging.getLogger(__name__)


class WorkerJobs:
    """The jobs and answers loops of ``Worker`` (which holds their state)."""

    def _jobs_loop(self) -> None:
        import redis

        backoff = Backoff(f"worker {self.id} jobs", self._stop)
        need_group = True
        while not self._stop.is_set():
            try:
                if need_group:
                    ensure_group(self.r, self.keys)
                    need_group = False
                # Warming: claim nothing (another worker, or this one once warm, takes the job).
                busy = self._leaving.is_set() or not self.warm
                with self._jobs_lock:
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
                            self._take_job(sid_str(entry_id), fields, 1)
                finally:
                    with self._jobs_lock:
                        self._reading = 0
            except redis.ResponseError as exc:
                if is_nogroup(exc):
                    need_group = True
                    logger.warning("worker %s: the consumer group is gone (Redis restarted?); recreating", self.id)
                    continue
                raise
            except self._conn_errors() as exc:
                need_group = True
                backoff.failed(exc)

    def _take_job(self, eid: str, fields: dict[Any, Any], deliveries: int) -> None:
        """Check one delivered job and hand it to the engine (or answer/drop it right away)."""
        raw = fields_get(fields, "m")
        try:
            msg = JobMessage.load(raw or b"")
        except Exception as exc:
            logger.error("worker %s: unreadable job entry %s: %s", self.id, eid, exc)
            self._dead_letter(eid, fields, f"unreadable: {exc}", None)
            return
        attempts = msg.attempt + deliveries - 1
        if time.time() > msg.deadline:
            self.counters["jobs_expired"] += 1
            logger.info("worker %s: job %s expired before it ran; dropped", self.id, msg.job)
            self._ack(eid)
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(self.keys.done(msg.job))
        pipe.exists(self.keys.gateway(msg.gateway) if msg.gateway else self.keys.done(msg.job))
        answered, gateway_up = pipe.execute()
        if answered:
            self.counters["jobs_duplicate"] += 1
            self._ack(eid)
            return
        if msg.gateway and not gateway_up:  # nobody waits for it: drop it unrun
            self.counters["jobs_orphaned"] += 1
            logger.info("worker %s: job %s belongs to gateway %s, which is gone; dropped", self.id, msg.job,
                        msg.gateway)
            self._ack(eid)
            return
        if attempts > self.cfg.max_attempts:
            self._dead_letter(eid, fields, f"delivered {attempts} times (limit {self.cfg.max_attempts})", msg)
            return
        try:
            image = decode_image(msg.image, fields_get(fields, "img") or b"",
                                 max_pixels=self.max_pixels) if msg.image else None
            future = self.runner.submit_job(config_from_wire(msg.config), image)
        except (DitstreamError, WireError, TypeError, ValueError) as exc:
            err = exc if isinstance(exc, DitstreamError) else ValidationError(f"bad job: {exc}")
            self.counters["jobs_failed"] += 1
            self._reply(eid, msg, None, err)
            return
        with self._jobs_lock:
            self._jobs[eid] = WorkerJob(eid, msg, future, time.perf_counter(), attempts)
        future.add_done_callback(lambda _f: self._finished.put(eid))

    def _answers_loop(self) -> None:
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
            with self._jobs_lock:
                job = self._jobs.get(eid)
            if job is None:
                continue
            try:
                self._finish(job)
                backoff.ok()
            except self._conn_errors() as exc:
                if time.time() < job.msg.deadline:
                    retry.append(eid)  # answer once Redis is back
                    backoff.failed(exc)
                    continue
            with self._jobs_lock:
                self._jobs.pop(eid, None)
            self._room.set()

    def _finish(self, job: WorkerJob) -> None:
        if job.future.cancelled():  # reaped: nobody waits for it (see ``_reap_orphans``)
            self._ack(job.entry)
            return
        exc = job.future.exception()
        if exc is None:
            out: StreamOutput = job.future.result()
            self.counters["jobs_done"] += 1
            self.counters["inference_s"] += out.timings.get("inference", 0.0)
            self._reply(job.entry, job.msg, out, None)
        elif isinstance(exc, RETRYABLE) and job.attempts < self.cfg.max_attempts and time.time() < job.msg.deadline:
            self.counters["jobs_retried"] += 1
            logger.warning("worker %s: job %s failed (%s); queued again (attempt %d)", self.id, job.msg.job,
                           exc, job.attempts + 1)
            retry_msg = job.msg.model_copy(update={"attempt": job.attempts + 1})
            fields = {"m": retry_msg.dump()}
            img = self.r.xrange(self.keys.jobs, job.entry, job.entry)
            if img:
                fields["img"] = fields_get(img[0][1], "img") or b""
            pipe = self.r.pipeline(transaction=True)
            pipe.xadd(self.keys.jobs, fields)
            pipe.xack(self.keys.jobs, self.keys.group, job.entry)
            pipe.xdel(self.keys.jobs, job.entry)
            pipe.execute()
        else:
            self.counters["jobs_failed"] += 1
            if isinstance(exc, RETRYABLE):
                self._dead_letter(job.entry, {"m": job.msg.dump()}, f"failed {job.attempts} times: {exc}", job.msg,
                                  last=exc)
            else:
                self._reply(job.entry, job.msg, None, exc)

    def _reply(self, eid: str, msg: JobMessage, out: StreamOutput | None, exc: BaseException | None) -> bool:
        # Coded as the REST response will send it (the gateway relays these bytes), else raw.
        meta, data = (encode_image(out.image, msg.output_format or "raw", msg.output_quality)
                      if out is not None else (None, b""))
        result = JobResult(job=msg.job, worker=self.id, image=meta, error=ErrorInfo.of(exc) if exc else None,
                           skipped=bool(out.skipped) if out else False, timings=dict(out.timings) if out else {})
        first = self._answer(keys=[self.keys.done(msg.job), msg.reply_to, self.keys.jobs],
                             args=[self.id, self.cfg.done_ttl_s, eid, self.keys.group, self.cfg.replies_len,
                                   result.dump(), data, self.cfg.replies_ttl_s])
        if not first:
            self.counters["jobs_duplicate"] += 1
            logger.info("worker %s: job %s was already answered; result discarded", self.id, msg.job)
        return bool(first)

    def _reap_orphans(self) -> None:
        """Cancel held jobs nobody waits for: past their deadline, answered or cancelled elsewhere, or
        whose gateway's liveness key has been gone for two beats running (one miss may be a Redis
        restart the gateway has not yet noticed). The engine drops a cancelled job, run or not."""
        with self._jobs_lock:
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
                self.counters["jobs_orphaned"] += 1
                logger.info("worker %s: job %s cancelled: %s", self.id, j.msg.job, why)

    def _ack(self, eid: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self.keys.jobs, self.keys.group, eid)
        pipe.xdel(self.keys.jobs, eid)
        pipe.execute()

    def _dead_letter(self, eid: str, fields: dict[Any, Any], reason: str, msg: JobMessage | None,
                     last: DitstreamError | None = None) -> None:
        """Park a job that keeps failing (with its reason) and tell the waiting gateway, once: with the
        class and details of its ``last`` error, so the client gets that error's status and code."""
        self.counters["jobs_dead_lettered"] += 1
        logger.error("worker %s: job entry %s to the dead-letter stream: %s", self.id, eid, reason)
        entry = {"m": fields_get(fields, "m") or b"", "reason": reason, "worker": self.id, "entry": eid}
        self.r.xadd(self.keys.dead_letter, entry, maxlen=self.cfg.dead_letter_len, approximate=True)
        if msg is not None:
            error = (type(last)(f"job {msg.job} {reason}", **last.details()) if last is not None
                     else GenerationError(f"job {msg.job} {reason}"))
            self._reply(eid, msg, None, error)
        else:
            self._ack(eid)

