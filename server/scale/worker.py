"""``ditstream worker``: an engine that takes REST jobs and pinned streams from Redis.

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
  jobs idle past ``claim_idle_s`` (their worker died) and sends jobs delivered ``max_attempts``
  times to the dead-letter stream; drops sessions that were re-pinned elsewhere.
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
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ditstream.engine.errors import DitstreamError, EngineDeadError, GenerationError, ValidationError
from ditstream.engine.runner import EngineRunner, StreamHandle
from ditstream.engine.types import StreamOutput
from ditstream.server.scale.config import (
    Backoff,
    ScaleConfig,
    connect,
    ensure_group,
    fields_get,
    is_nogroup,
    redact,
    sid_str,
)
from ditstream.server.scale.messages import (
    ErrorInfo,
    FrameHeader,
    Heartbeat,
    JobMessage,
    JobResult,
    OutputHeader,
    SessionControl,
    SessionRecord,
    SessionReply,
    WireError,
    config_from_wire,
    config_to_wire,
    decode_image,
    encode_image,
)

logger = logging.getLogger(__name__)

# KEYS: done, reply stream, jobs stream. ARGV: worker, done ttl, entry id, group, reply maxlen, m, img.
# Answer at most once (SET NX), then acknowledge and delete the entry whatever happened.
_ANSWER_LUA = """
local first = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2]))
if first and KEYS[2] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[5]), '*', 'm', ARGV[6], 'img', ARGV[7])
  redis.call('EXPIRE', KEYS[2], 3600)
end
if ARGV[3] ~= '' then
  pcall(redis.call, 'XACK', KEYS[3], ARGV[4], ARGV[3])
  redis.call('XDEL', KEYS[3], ARGV[3])
end
if first then return 1 else return 0 end
"""

#: Engine errors worth another attempt on another worker (anything else is the request's fault).
_RETRYABLE = (GenerationError, EngineDeadError)


@dataclass
class _Job:
    entry: str
    msg: JobMessage
    future: Future
    started: float
    attempts: int


@dataclass
class _Session:
    sid: str
    handle: StreamHandle
    epoch: int
    reply_to: str
    last_in: str = "0-0"
    config: dict[str, Any] = field(default_factory=dict)


class Worker:
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
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._room = threading.Event()
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._out_wake = threading.Event()
        self._replies: queue.SimpleQueue[tuple[str, SessionReply]] = queue.SimpleQueue()
        self._answer = self.r.register_script(_ANSWER_LUA)
        self._ctl_last = "0-0"
        self._claim_cursor = "0-0"
        self.counters: dict[str, float] = {k: 0 for k in (
            "jobs_done", "jobs_failed", "jobs_expired", "jobs_duplicate", "jobs_claimed", "jobs_dead_lettered",
            "jobs_retried", "frames_in", "frames_out", "sessions_opened", "inference_s")}
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------ lifecycle
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

    # ------------------------------------------------------------------------------ heartbeat + janitor
    def heartbeat(self) -> Heartbeat:
        with self._jobs_lock:
            inflight = len(self._jobs)
        info = {k: v for k, v in self.runner.info.items() if k in (
            "model", "backend", "device", "dtype", "size_multiple", "defaults")}
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
        """XAUTOCLAIM jobs of dead workers, as many as we have room for."""
        import redis

        room = self.cfg.max_jobs - len(self._jobs)
        if room <= 0:
            return
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
            logger.info("worker %s claimed job entry %s (delivery %d) from a dead worker", self.id, eid, deliveries)
            self._take_job(eid, fields, deliveries)

    def _drop_foreign_sessions(self) -> None:
        """Close sessions whose record moved to another worker (we were taken for dead) or vanished."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        if not sessions:
            return
        raws = self.r.mget([self.keys.session(s.sid) for s in sessions])
        for s, raw in zip(sessions, raws):
            keep = False
            if raw is not None:
                with contextlib.suppress(Exception):
                    rec = SessionRecord.load(raw)
                    keep = rec.worker == self.id and rec.epoch <= s.epoch
            if not keep:
                logger.info("worker %s: session %s is no longer pinned here; closing it", self.id, s.sid)
                self._close_session(s.sid)

    # ------------------------------------------------------------------------------ jobs
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
                    room = 0 if busy else self.cfg.max_jobs - len(self._jobs)
                if room <= 0:
                    self._room.wait(0.2)
                    self._room.clear()
                    continue
                resp = self.r.xreadgroup(self.keys.group, self.id, {self.keys.jobs: ">"}, count=room, block=500)
                backoff.ok()
                for _stream, entries in resp or ():
                    for entry_id, fields in entries:
                        self._take_job(sid_str(entry_id), fields, 1)
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
        if self.r.exists(self.keys.done(msg.job)):
            self.counters["jobs_duplicate"] += 1
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
            self._jobs[eid] = _Job(eid, msg, future, time.perf_counter(), attempts)
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

    def _finish(self, job: _Job) -> None:
        exc = job.future.exception()
        if exc is None:
            out: StreamOutput = job.future.result()
            self.counters["jobs_done"] += 1
            self.counters["inference_s"] += out.timings.get("inference", 0.0)
            self._reply(job.entry, job.msg, out, None)
        elif isinstance(exc, _RETRYABLE) and job.attempts < self.cfg.max_attempts and time.time() < job.msg.deadline:
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
            if isinstance(exc, _RETRYABLE):
                self._dead_letter(job.entry, {"m": job.msg.dump()}, f"failed {job.attempts} times: {exc}", job.msg)
            else:
                self._reply(job.entry, job.msg, None, exc)

    def _reply(self, eid: str, msg: JobMessage, out: StreamOutput | None, exc: BaseException | None) -> bool:
        meta, data = (encode_image(out.image, "raw") if out is not None else (None, b""))
        result = JobResult(job=msg.job, worker=self.id, image=meta, error=ErrorInfo.of(exc) if exc else None,
                           skipped=bool(out.skipped) if out else False, timings=dict(out.timings) if out else {})
        first = self._answer(keys=[self.keys.done(msg.job), msg.reply_to, self.keys.jobs],
                             args=[self.id, self.cfg.done_ttl_s, eid, self.keys.group, self.cfg.replies_len,
                                   result.dump(), data])
        if not first:
            self.counters["jobs_duplicate"] += 1
            logger.info("worker %s: job %s was already answered; result discarded", self.id, msg.job)
        return bool(first)

    def _ack(self, eid: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self.keys.jobs, self.keys.group, eid)
        pipe.xdel(self.keys.jobs, eid)
        pipe.execute()

    def _dead_letter(self, eid: str, fields: dict[Any, Any], reason: str, msg: JobMessage | None) -> None:
        """Park a job that keeps failing (with its reason) and tell the waiting gateway, once."""
        self.counters["jobs_dead_lettered"] += 1
        logger.error("worker %s: job entry %s to the dead-letter stream: %s", self.id, eid, reason)
        entry = {"m": fields_get(fields, "m") or b"", "reason": reason, "worker": self.id, "entry": eid}
        self.r.xadd(self.keys.dead_letter, entry, maxlen=self.cfg.dead_letter_len, approximate=True)
        if msg is not None:
            self._reply(eid, msg, None, GenerationError(f"job {msg.job} {reason}"))
        else:
            self._ack(eid)

    # ------------------------------------------------------------------------------ sessions
    def _sessions_loop(self) -> None:
        import redis

        backoff = Backoff(f"worker {self.id} sessions", self._stop)
        ctl = self.keys.worker_control(self.id)
        while not self._stop.is_set():
            with self._sessions_lock:
                streams = {ctl: self._ctl_last, **{self.keys.frames_in(s.sid): s.last_in
                                                   for s in self._sessions.values()}}
            try:
                resp = self.r.xread(streams, block=500, count=16)
                backoff.ok()
            except (*self._conn_errors(), redis.ResponseError) as exc:
                backoff.failed(exc)
                continue
            for key, entries in resp or ():
                name = sid_str(key)
                if name == ctl:
                    for entry_id, fields in entries:
                        self._ctl_last = sid_str(entry_id)
                        self._on_control(fields)
                else:
                    self._on_frames(name.rsplit(":", 1)[1], entries)

    def _on_control(self, fields: dict[Any, Any]) -> None:
        try:
            msg = SessionControl.load(fields_get(fields, "m") or b"")
        except Exception as exc:
            logger.error("worker %s: unreadable control message: %s", self.id, exc)
            return
        if msg.kind == "wake":
            return
        if msg.kind == "close":
            self._close_session(msg.session)
            return
        if msg.kind == "open":
            self._open_session(msg)
            return
        with self._sessions_lock:
            s = self._sessions.get(msg.session)
        if s is None or msg.epoch < s.epoch:
            self._send_reply(msg, None, ValidationError(f"session {msg.session} is not open on {self.id}"))
            return
        try:
            fut = s.handle.reconfigure(**_fields(config_from_wire(msg.config or {})))
        except DitstreamError as exc:
            self._send_reply(msg, None, exc)
            return

        def done(f: Future) -> None:  # engine thread: only queue, never touch Redis here
            exc = f.exception()
            if exc is None:
                s.config = config_to_wire(f.result())
            self._queue_reply(msg, f.result() if exc is None else None, exc)

        fut.add_done_callback(done)

    def _open_session(self, msg: SessionControl) -> None:
        old = None
        with self._sessions_lock:
            old = self._sessions.pop(msg.session, None)
        if old is not None:
            old.handle.close()
        try:
            cfg = config_from_wire(msg.config or {})
            handle = self.runner.add_stream(cfg, notify=self._out_wake.set, timeout=30.0)
        except (DitstreamError, TypeError, ValueError) as exc:
            self._send_reply(msg, None, exc if isinstance(exc, DitstreamError) else ValidationError(str(exc)))
            return
        with self._sessions_lock:
            self._sessions[msg.session] = _Session(msg.session, handle, msg.epoch, msg.reply_to,
                                                   config=config_to_wire(handle.config))
        self.counters["sessions_opened"] += 1
        logger.info("worker %s: session %s opened (epoch %d)", self.id, msg.session, msg.epoch)
        self._send_reply(msg, handle.config, None)

    def _close_session(self, sid: str) -> None:
        with self._sessions_lock:
            s = self._sessions.pop(sid, None)
        if s is not None:
            with contextlib.suppress(DitstreamError):
                s.handle.close()
            logger.info("worker %s: session %s closed", self.id, sid)

    def _on_frames(self, sid: str, entries: list[Any]) -> None:
        with self._sessions_lock:
            s = self._sessions.get(sid)
        if s is None or not entries:
            return
        entry_id, fields = entries[-1]  # latest wins: older frames in this read are skipped
        s.last_in = sid_str(entry_id)
        try:
            head = FrameHeader.load(fields_get(fields, "m") or b"")
            image = decode_image(head.image, fields_get(fields, "img") or b"",
                                 max_pixels=self.max_pixels) if head.image else None
            s.handle.submit(image, head.seq, head.ts)
            self.counters["frames_in"] += 1
        except (DitstreamError, WireError, ValueError) as exc:
            logger.debug("worker %s: frame for %s refused: %s", self.id, sid, exc)

    def _send_reply(self, msg: SessionControl, cfg: Any, exc: BaseException | None) -> None:
        reply = SessionReply(session=msg.session, request=msg.request, worker=self.id,
                             config=config_to_wire(cfg) if cfg is not None else None,
                             error=ErrorInfo.of(exc) if exc is not None else None)
        if msg.reply_to:
            self.r.xadd(msg.reply_to, {"m": reply.dump()}, maxlen=self.cfg.replies_len, approximate=True)

    def _queue_reply(self, msg: SessionControl, cfg: Any, exc: BaseException | None) -> None:
        reply = SessionReply(session=msg.session, request=msg.request, worker=self.id,
                             config=config_to_wire(cfg) if cfg is not None else None,
                             error=ErrorInfo.of(exc) if exc is not None else None)
        self._replies.put((msg.reply_to, reply))
        self._out_wake.set()

    def _outputs_loop(self) -> None:
        """Ship every session's outputs (and queued control replies) to Redis; woken by the engine."""
        backoff = Backoff(f"worker {self.id} outputs", self._stop)
        codec, quality = self.cfg.frame_codec, self.cfg.jpeg_quality
        while not self._stop.is_set():
            self._out_wake.wait(0.2)
            self._out_wake.clear()
            with self._sessions_lock:
                sessions = list(self._sessions.values())
            pipe = self.r.pipeline(transaction=False)
            n = 0
            for s in sessions:
                for out in s.handle.outputs.drain():
                    if out.error is not None:  # its model call failed: the error travels in the frame's place
                        meta, data = None, b""
                    else:
                        meta, data = encode_image(out.image, codec, quality)
                    head = OutputHeader(seq=out.seq, ts=out.ts, image=meta, skipped=out.skipped,
                                        timings=dict(out.timings), worker=self.id,
                                        error=ErrorInfo.of(out.error) if out.error is not None else None)
                    pipe.xadd(self.keys.frames_out(s.sid), {"m": head.dump(), "img": data},
                              maxlen=self.cfg.frames_out_len, approximate=False)
                    n += 1
                if n:
                    pipe.expire(self.keys.frames_out(s.sid), 3600)
            while True:
                try:
                    reply_to, reply = self._replies.get_nowait()
                except queue.Empty:
                    break
                if reply_to:
                    pipe.xadd(reply_to, {"m": reply.dump()}, maxlen=self.cfg.replies_len, approximate=True)
                    n += 1
            if not n:
                continue
            try:
                pipe.execute()
                self.counters["frames_out"] += n
                backoff.ok()
            except self._conn_errors() as exc:  # outputs of this moment are lost: latest wins anyway
                backoff.failed(exc)


def _fields(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
