"""Live sessions pinned to a worker: their controls, input frames and outputs; a mixin of ``Worker``."""

from __future__ import annotations

import contextlib
import logging
import queue
from concurrent.futures import Future
from typing import Any

from ditstream.engine.errors import DitstreamError, ValidationError
from ditstream.engine.runner import Control, Op, StreamHandle
from ditstream.server.scale.config import (
    Backoff,
    fields_get,
    sid_str,
)
from ditstream.server.scale.messages import (
    SESSION_TTL_S,
    ErrorInfo,
    FrameHeader,
    OutputHeader,
    SessionControl,
    SessionReply,
    WireError,
    config_from_wire,
    config_to_wire,
    decode_image,
    encode_image,
)
from ditstream.server.scale.worker_state import WorkerSession

logger = logging.getLogger(__name__)


class WorkerSessions:
    """The sessions and outputs loops of ``Worker`` (which holds their state)."""

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
            self._close_session(msg.session)
            return
        with self._sessions_lock:
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
            if exc is None:
                s.config = config_to_wire(f.result())
            self._queue_reply(msg, f.result() if exc is None else None, exc)

        fut.add_done_callback(done)

    def _start_open(self, msg: SessionControl, opening: list[tuple[SessionControl, Future]]) -> None:
        if any(m.session == msg.session for m, _f in opening):  # re-opened in the same batch: open the first
            self._finish_opens(opening)
        with self._sessions_lock:
            old = self._sessions.pop(msg.session, None)
        if old is not None:
            old.handle.close()
        try:
            cfg = self.runner.validate(config_from_wire(msg.config or {}))
            opening.append((msg, self.runner.send(Control(Op.ADD, config=cfg, notify=self._out_wake.set))))
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
            with self._sessions_lock:
                self._sessions[msg.session] = WorkerSession(msg.session, handle, msg.epoch, msg.reply_to,
                                                            config=config_to_wire(handle.config))
            self.counters["sessions_opened"] += 1
            logger.info("worker %s: session %s opened (epoch %d)", self.id, msg.session, msg.epoch)
            self._send_reply(msg, handle.config, None)

    def _close_session(self, sid: str, only: WorkerSession | None = None) -> None:
        """Close ``sid`` (only if it is still ``only``, when given: a newer open may have replaced it)."""
        with self._sessions_lock:
            if only is not None and self._sessions.get(sid) is not only:
                return
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
            if head.epoch > s.epoch:  # the gateway moved the session away: stop answering it now
                logger.info("worker %s: session %s moved on (epoch %d > %d); closing it", self.id, sid,
                            head.epoch, s.epoch)
                self._close_session(sid, s)
                return
            if head.epoch < s.epoch:  # sent before this pin (another worker answered it, or it is re-sent)
                self.counters["frames_stale"] += 1
                return
            s.quality = head.quality
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
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(msg.reply_to, {"m": reply.dump()}, maxlen=self.cfg.replies_len, approximate=True)
            pipe.expire(msg.reply_to, self.cfg.replies_ttl_s)
            pipe.execute()

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
                        meta, data = encode_image(out.image, codec, s.quality or quality)
                    head = OutputHeader(seq=out.seq, ts=out.ts, image=meta, skipped=out.skipped,
                                        timings=dict(out.timings), worker=self.id, epoch=s.epoch,
                                        error=ErrorInfo.of(out.error) if out.error is not None else None)
                    pipe.xadd(self.keys.frames_out(s.sid), {"m": head.dump(), "img": data},
                              maxlen=self.cfg.frames_out_len, approximate=False)
                    n += 1
                if n:
                    pipe.expire(self.keys.frames_out(s.sid), SESSION_TTL_S)
            while True:
                try:
                    reply_to, reply = self._replies.get_nowait()
                except queue.Empty:
                    break
                if reply_to:
                    pipe.xadd(reply_to, {"m": reply.dump()}, maxlen=self.cfg.replies_len, approximate=True)
                    pipe.expire(reply_to, self.cfg.replies_ttl_s)
                    n += 1
            if not n:
                continue
            try:
                pipe.execute()
                self.counters["frames_out"] += n
                backoff.ok()
            except self._conn_errors() as exc:  # outputs of this moment are lost: latest wins anyway
                backoff.failed(exc)

