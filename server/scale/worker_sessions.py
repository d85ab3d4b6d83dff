"""Live sessions pinned to a worker: their controls (open, reconfigure, close) and input frames.

The **sessions** thread runs here: one ``XREAD`` over this worker's control stream and the input
stream of every session pinned here; only the newest frame of each session is submitted (latest
wins). Outputs leave through ``WorkerOutputs``. The session table is this object's, under its lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ditstream.engine.errors import DitstreamError, ValidationError
from ditstream.engine.runner import Control, EngineRunner, Op, StreamHandle
from ditstream.server.scale.config import Backoff, ScaleConfig, conn_errors, fields_get, sid_str
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.messages import (
    ErrorInfo,
    FrameHeader,
    OutputHeader,
    SessionControl,
    SessionRecord,
    SessionReply,
    WireError,
    config_from_wire,
    config_to_wire,
    decode_image,
)
from ditstream.server.scale.worker_outputs import WorkerOutputs

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)


@dataclass
class WorkerSession:
    """A session pinned here: its engine stream, its pin's epoch and where its input was read up to."""

    sid: str
    handle: StreamHandle
    epoch: int
    last_in: str = "0-0"
    #: JPEG quality of its outputs, as its client asked (0: ``jpeg_quality``).
    quality: int = 0


class WorkerSessions:
    """The sessions pinned to this worker, and the thread that feeds them."""

    def __init__(self, r: redis.Redis, cfg: ScaleConfig, worker_id: str, runner: EngineRunner,
                 outputs: WorkerOutputs, counters: Counters, stop: threading.Event, *, max_pixels: int) -> None:
        self.r = r
        self.cfg = cfg
        self.keys = cfg.keys
        self.id = worker_id
        self.runner = runner
        self.outputs = outputs
        self.counters = counters
        self.max_pixels = max_pixels
        self._stop = stop
        self._lock = threading.Lock()
        self._sessions: dict[str, WorkerSession] = {}
        self._ctl_last = "0-0"

    def snapshot(self) -> list[WorkerSession]:
        with self._lock:
            return list(self._sessions.values())

    def count(self) -> int:
        return len(self._sessions)

    def has(self, sid: str) -> bool:
        return sid in self._sessions

    def loop(self) -> None:
        """The sessions thread."""
        import redis

        backoff = Backoff(f"worker {self.id} sessions", self._stop)
        ctl = self.keys.worker_control(self.id)
        while not self._stop.is_set():
            with self._lock:
                streams = {ctl: self._ctl_last, **{self.keys.frames_in(s.sid): s.last_in
                                                   for s in self._sessions.values()}}
            try:
                resp = self.r.xread(streams, block=500, count=16)
                backoff.ok()
            except (*conn_errors(), redis.ResponseError) as exc:
                backoff.failed(exc)
                continue
            for key, entries in resp or ():
                name = sid_str(key)
                if name == ctl:
                    opening: list[tuple[SessionControl, Future]] = []
                    for entry_id, fields in entries:
                        self._ctl_last = sid_str(entry_id)
                        self._on_control(fields, opening)
                    self._finish_opens(opening)
                else:
                    self._on_frames(name.rsplit(":", 1)[1], entries)

    def _on_control(self, fields: dict[Any, Any], opening: list[tuple[SessionControl, Future]]) -> None:
        """Handle one control. Opens are only started (``opening``): a batch of them (a dead worker's
        sessions moving here) reaches the engine at once, so they all open within one engine tick;
        they are finished before any other control, so a later close or reconfigure sees them."""
        try:
            msg = SessionControl.load(fields_get(fields, "m") or b"")
        except Exception as exc:
            logger.error("worker %s: unreadable control message: %s", self.id, exc)
            return
        if msg.kind == "wake":
            return
        if msg.kind == "open":
            self._start_open(msg, opening)
            return
        self._finish_opens(opening)
        if msg.kind == "close":
            self.close_session(msg.session)
            return
        with self._lock:
            s = self._sessions.get(msg.session)
        if s is None or msg.epoch < s.epoch:
            self._send_reply(msg, None, ValidationError(f"session {msg.session} is not open on {self.id}"))
            return
        try:
            fut = s.handle.reconfigure(**config_from_wire(msg.config or {}).fields())
        except DitstreamError as exc:
            self._send_reply(msg, None, exc)
            return

        def done(f: Future) -> None:  # engine thread: only queue, never touch Redis here
            exc = f.exception()
            self._queue_reply(msg, f.result() if exc is None else None, exc)

        fut.add_done_callback(done)

    def _start_open(self, msg: SessionControl, opening: list[tuple[SessionControl, Future]]) -> None:
        if any(m.session == msg.session for m, _f in opening):  # re-opened in the same batch: open the first
            self._finish_opens(opening)
        with self._lock:
            old = self._sessions.pop(msg.session, None)
        if old is not None:
            old.handle.close()
        try:
            cfg = self.runner.validate(config_from_wire(msg.config or {}))
            opening.append((msg, self.runner.send(Control(Op.ADD, config=cfg, notify=self.outputs.wake))))
        except (DitstreamError, TypeError, ValueError) as exc:
            self._send_reply(msg, None, exc if isinstance(exc, DitstreamError) else ValidationError(str(exc)))

    def _finish_opens(self, opening: list[tuple[SessionControl, Future]]) -> None:
        while opening:
            msg, fut = opening.pop(0)
            try:
                handle = StreamHandle(self.runner, fut.result(30.0))
            except (DitstreamError, TypeError, ValueError) as exc:
                self._send_reply(msg, None, exc if isinstance(exc, DitstreamError) else ValidationError(str(exc)))
                continue
            with self._lock:
                self._sessions[msg.session] = WorkerSession(msg.session, handle, msg.epoch)
            self.counters.add("sessions_opened")
            logger.info("worker %s: session %s opened (epoch %d)", self.id, msg.session, msg.epoch)
            self._send_reply(msg, handle.config, None)

    def close_session(self, sid: str, only: WorkerSession | None = None) -> None:
        """Close ``sid`` (only if it is still ``only``, when given: a newer open may have replaced it)."""
        with self._lock:
            if only is not None and self._sessions.get(sid) is not only:
                return
            s = self._sessions.pop(sid, None)
        if s is not None:
            with contextlib.suppress(DitstreamError):
                s.handle.close()
            logger.info("worker %s: session %s closed", self.id, sid)

    def _on_frames(self, sid: str, entries: list[Any]) -> None:
        with self._lock:
            s = self._sessions.get(sid)
        if s is None or not entries:
            return
        entry_id, fields = entries[-1]  # latest wins: older frames in this read are skipped
        s.last_in = sid_str(entry_id)
        head: FrameHeader | None = None
        try:
            head = FrameHeader.load(fields_get(fields, "m") or b"")
            if head.epoch > s.epoch:  # the gateway moved the session away: stop answering it now
                logger.info("worker %s: session %s moved on (epoch %d > %d); closing it", self.id, sid,
                            head.epoch, s.epoch)
                self.close_session(sid, s)
                return
            if head.epoch < s.epoch:  # sent before this pin (another worker answered it, or it is re-sent)
                self.counters.add("frames_stale")
                return
            s.quality = head.quality
            image = decode_image(head.image, fields_get(fields, "img") or b"",
                                 max_pixels=self.max_pixels) if head.image else None
            s.handle.submit(image, head.seq, head.ts)
            self.counters.add("frames_in")
        except (DitstreamError, WireError, ValueError) as exc:
            logger.debug("worker %s: frame for %s refused: %s", self.id, sid, exc)
            if head is not None:  # the client is told, as an in-process engine's intake tells it
                err = exc if isinstance(exc, DitstreamError) else ValidationError(str(exc), field="image")
                self.outputs.queue_refusal(sid, OutputHeader(seq=head.seq, ts=head.ts, worker=self.id, epoch=s.epoch,
                                                             error=ErrorInfo.of(err), refused=True))

    def _send_reply(self, msg: SessionControl, cfg: Any, exc: BaseException | None) -> None:
        reply = SessionReply(session=msg.session, request=msg.request, worker=self.id,
                             config=config_to_wire(cfg) if cfg is not None else None,
                             error=ErrorInfo.of(exc) if exc is not None else None)
        if msg.reply_to:
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(msg.reply_to, {"m": reply.dump()}, maxlen=self.cfg.replies_len, approximate=True)
            pipe.expire(msg.reply_to, self.cfg.replies_ttl_s)
            pipe.execute()

    def _queue_reply(self, msg: SessionControl, cfg: Any, exc: BaseException | None) -> None:
        reply = SessionReply(session=msg.session, request=msg.request, worker=self.id,
                             config=config_to_wire(cfg) if cfg is not None else None,
                             error=ErrorInfo.of(exc) if exc is not None else None)
        self.outputs.queue_reply(msg.reply_to, reply)

    def drop_foreign(self) -> None:
        """Close sessions whose record moved to another worker (we were taken for dead) or vanished."""
        sessions = self.snapshot()
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
                self.close_session(s.sid)

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.handle.close()
