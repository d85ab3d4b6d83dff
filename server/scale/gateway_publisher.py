"""The gateway's publisher: the one thread that writes work to Redis, and the outbox it drains.

Calls from the event loop (``submit``, ``submit_job``, ``reconfigure``, ``close``) never touch the
network: they leave an item in the ``Outbox`` (or a frame in the session's slot) and wake the
publisher, which sends them in one pipeline.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from ditstream.server.scale.config import Backoff, ScaleConfig, conn_errors, sid_str
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.gateway_stream import GatewayStreamHandle
from ditstream.server.scale.messages import SESSION_TTL_S, FrameHeader, Keys, SessionControl, encode_image

if TYPE_CHECKING:
    import redis
    from ditstream.server.scale.gateway_jobs import GatewayJobs
    from ditstream.server.scale.gateway_sessions import GatewaySessions

logger = logging.getLogger(__name__)


class Outbox:
    """Items for the publisher — ``("job", id)``, ``("cancel", id)``, ``("control", (worker, msg))``,
    ``("close", (worker, session, epoch))``, ``("wake-reader", None)`` — and the event that wakes it."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()

    def put(self, kind: str, item: Any) -> None:
        self._items.put((kind, item))
        self._wake.set()

    def wake(self) -> None:
        """A frame waits in a session's slot (or the gateway stops): send now."""
        self._wake.set()

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def empty(self) -> bool:
        return self._items.empty()

    def take(self) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

    def put_back(self, items: list[tuple[str, Any]]) -> None:
        for it in items:
            self._items.put(it)


def xadd_frame(pipe: Any, keys: Keys, cfg: ScaleConfig, h: GatewayStreamHandle, seq: int, ts: float, meta: Any,
               data: bytes) -> None:
    """Queue one input frame of ``h`` on ``pipe``, under the session's current epoch."""
    head = FrameHeader(seq=seq, ts=ts, image=meta, epoch=h.epoch, quality=h.output_quality)
    pipe.xadd(keys.frames_in(h.id), {"m": head.dump(), "img": data}, maxlen=cfg.frames_in_len, approximate=False)
    pipe.expire(keys.frames_in(h.id), SESSION_TTL_S)


class Publisher:
    """Sends the outbox (jobs, controls, cancels, closes) and each session's newest frame."""

    def __init__(self, r: redis.Redis, cfg: ScaleConfig, gateway_id: str, replies: str, outbox: Outbox,
                 jobs: GatewayJobs, sessions: GatewaySessions, counters: Counters, stop: threading.Event) -> None:
        self.r = r
        self.cfg = cfg
        self.keys = cfg.keys
        self.id = gateway_id
        self.replies = replies
        self.outbox = outbox
        self.jobs = jobs
        self.sessions = sessions
        self.counters = counters
        self._stop = stop

    def loop(self) -> None:
        backoff = Backoff(f"gateway {self.id} publisher", self._stop)
        while not self._stop.is_set():
            self.outbox.wait(0.1)
            try:
                self.flush()
                self._send_frames()
                backoff.ok()
            except conn_errors() as exc:
                backoff.failed(exc)

    def flush(self) -> None:
        """Send queued jobs/controls/cancels; an item that fails to send is put back first."""
        if self.outbox.empty():  # the common case, once per frame: no pipeline built for nothing
            return
        pipe = self.r.pipeline(transaction=False)
        # First: our liveness key exists before any job of ours is in the stream (after a Redis
        # restart, too), so no worker takes a job of ours for an orphan. Sent only with items.
        pipe.set(self.keys.gateway(self.id), b"1", px=int(self.cfg.gateway_ttl_s * 1e3))
        items = self.outbox.take()
        sent: list[tuple[int, str]] = []  # (its place in the pipeline, job): each job's entry is noted
        for kind, item in items:
            if kind == "job":
                pending = self.jobs.get(item)
                if pending is None:
                    continue
                fields: dict[str, Any] = {"m": pending.msg.dump()}
                if pending.image:
                    fields["img"] = pending.image
                sent.append((len(pipe), item))
                pipe.xadd(self.keys.jobs, fields)
                self.counters.add("jobs_sent")
            elif kind == "cancel":
                pipe.set(self.keys.done(item), f"cancelled-by-{self.id}", nx=True, ex=self.cfg.done_ttl_s)
            elif kind == "control":
                wid, msg = item
                pipe.xadd(self.keys.worker_control(wid), {"m": msg.dump()}, maxlen=1000, approximate=True)
            elif kind == "close":
                wid, sid, epoch = item
                if wid:
                    msg = SessionControl(kind="close", session=sid, epoch=epoch)
                    pipe.xadd(self.keys.worker_control(wid), {"m": msg.dump()}, maxlen=1000, approximate=True)
                pipe.delete(self.keys.session(sid), self.keys.frames_in(sid), self.keys.frames_out(sid))
            elif kind == "wake-reader":
                pipe.xadd(self.replies, {"m": b"{}"}, maxlen=self.cfg.replies_len, approximate=True)
                pipe.expire(self.replies, self.cfg.replies_ttl_s)
        if not items:
            return
        try:
            results = pipe.execute()
        except BaseException:
            self.outbox.put_back(items)
            raise
        for i, job in sent:
            self.jobs.mark_sent(job, sid_str(results[i]))

    def _send_frames(self) -> None:
        pipe = None
        n = 0
        for h in self.sessions.handles():
            item = h.slot.take()
            if item is None or not h.worker:
                continue
            if pipe is None:  # built only when a frame is there (the loop also wakes for outbox items)
                pipe = self.r.pipeline(transaction=False)
            image, seq, ts, coded = item
            if coded is not None:  # the client's bytes, relayed as they are
                meta, data = coded
            elif image is not None:
                meta, data = encode_image(image, self.cfg.frame_codec, self.cfg.jpeg_quality)
            else:
                meta, data = None, b""
            h.sent.append((seq, ts, meta, data))
            xadd_frame(pipe, self.keys, self.cfg, h, seq, ts, meta, data)
            n += 1
        if pipe is not None:
            pipe.execute()
            self.counters.add("frames_sent", n)
