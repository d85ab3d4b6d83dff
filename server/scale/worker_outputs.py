"""The worker's outputs thread: ships every session's outputs, and the queued control replies, to Redis.

The engine thread only wakes it (``wake``) and queues replies (``queue_reply``): it never touches
Redis. One pipeline per wake-up carries every session's new outputs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ditstream.server.scale.config import Backoff, ScaleConfig, conn_errors
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.messages import SESSION_TTL_S, ErrorInfo, OutputHeader, SessionReply, encode_image

if TYPE_CHECKING:
    import redis
    from ditstream.server.scale.worker_sessions import WorkerSession


class WorkerOutputs:
    """Outputs and control replies on their way to the gateways."""

    def __init__(self, r: redis.Redis, cfg: ScaleConfig, worker_id: str, counters: Counters,
                 stop: threading.Event) -> None:
        self.r = r
        self.cfg = cfg
        self.keys = cfg.keys
        self.id = worker_id
        self.counters = counters
        self._stop = stop
        self._wake = threading.Event()
        self._replies: queue.SimpleQueue[tuple[str, SessionReply]] = queue.SimpleQueue()
        self._refusals: queue.SimpleQueue[tuple[str, OutputHeader]] = queue.SimpleQueue()

    def wake(self) -> None:
        """An output is ready (the engine's notify) or a reply is queued: ship now."""
        self._wake.set()

    def queue_reply(self, reply_to: str, reply: SessionReply) -> None:
        """A control reply from a thread that must not block on Redis (the engine's)."""
        self._replies.put((reply_to, reply))
        self._wake.set()

    def queue_refusal(self, sid: str, head: OutputHeader) -> None:
        """An input frame of session ``sid`` this worker refused: its error goes back in its place."""
        self._refusals.put((sid, head))
        self._wake.set()

    def loop(self, sessions: Callable[[], list[WorkerSession]]) -> None:
        """Ship every session's outputs (and queued control replies); woken by the engine."""
        backoff = Backoff(f"worker {self.id} outputs", self._stop)
        codec, quality = self.cfg.frame_codec, self.cfg.jpeg_quality
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            pipe = self.r.pipeline(transaction=False)
            n = 0
            for s in sessions():
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
                    sid, refused = self._refusals.get_nowait()
                except queue.Empty:
                    break
                pipe.xadd(self.keys.frames_out(sid), {"m": refused.dump(), "img": b""},
                          maxlen=self.cfg.frames_out_len, approximate=False)
                n += 1
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
                self.counters.add("frames_out", n)
                backoff.ok()
            except conn_errors() as exc:  # outputs of this moment are lost: latest wins anyway
                backoff.failed(exc)
