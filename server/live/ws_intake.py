"""A WebSocket stream's input frames on their way to the engine: header parsed, then either decoded in the
codec pool (in process) or checked and relayed as the client coded them (a gateway's stream, which
its worker decodes).

Decoding: one codec job at a time per stream decodes the received frames in order (at most
``DECODE_DEPTH`` wait, as in the engine's inbox) and offers them to the engine itself, so neither the
frame nor its result wakes the event loop again; only an error does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ditstream.engine.errors import DitstreamError, PayloadTooLargeError
from ditstream.engine.imagefile import check_header
from ditstream.server import codec
from ditstream.server.engine_client import EngineStream
from ditstream.server.live import timing
from ditstream.server.live.protocol import frame_header_fields, unpack_frame
from ditstream.server.live.session import LiveSession

logger = logging.getLogger(__name__)

#: Frames a stream may hold undecoded: the engine inbox's depth (``FrameInbox``), so the decode step
#: drops nothing the engine would keep (a client with two frames in flight loses none).
DECODE_DEPTH = 2

_Job = tuple[memoryview, int, float, tuple[int, int]]


class FrameIntake:
    """Binary frames of one WebSocket stream → its engine stream (see the module docstring)."""

    def __init__(self, live: LiveSession, handle: EngineStream, pool: Any,
                 on_error: Callable[[int, float, DitstreamError], None], on_good: Callable[[], None]) -> None:
        self.live = live
        self.handle = handle
        self.settings = live.settings
        self.pool = pool
        self.on_error = on_error  # called on the loop, with the frame's seq and ts
        self.on_good = on_good  # a frame reached the engine: the run of bad messages ends
        #: The handle takes the client's coded bytes as they are (``EngineStream.takes_encoded``).
        self.relaying = handle.takes_encoded
        #: Received frames not yet decoded, as deep as the engine's inbox (``DECODE_DEPTH``: a client
        #: with two frames in flight keeps both; a third drops the oldest), and whether a codec thread
        #: is draining them: frames are decoded one at a time per stream, in order.
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._scheduled = False
        self._ended = False

    def frame(self, data: bytes, t_recv: float) -> None:
        """On the loop: a binary message received at ``t_recv``; raises for a bad one."""
        limit = self.settings.max_frame_bytes
        if len(data) > limit:
            raise PayloadTooLargeError(f"frame is {len(data)} bytes; the limit is {limit}", field="frame")
        header, image_bytes = unpack_frame(data)
        seq, ts = frame_header_fields(header)
        seq = self.live.arrivals.arrive(seq, t_recv)
        if ts is None:
            ts = time.time() * 1e3
        cfg = self.live.config
        if self.relaying:
            self._relay(image_bytes, seq, ts, (cfg.width, cfg.height))
            return
        with self._lock:
            replaced = self._queue.popleft() if len(self._queue) >= DECODE_DEPTH else None
            self._queue.append((image_bytes, seq, ts, (cfg.width, cfg.height)))
            start, self._scheduled = not self._scheduled, True
        if replaced is not None:  # not decoded yet and already superseded twice: dropped like a late frame
            self.live.frame_dropped(replaced[1])
        if start:
            self.pool.submit(self._decode_pending)

    def end(self) -> None:
        """The stream is over: a frame not decoded yet is not worth decoding now."""
        with self._lock:
            self._queue.clear()
            self._ended = True

    def _relay(self, data: memoryview, seq: int, ts: float, size: tuple[int, int]) -> None:
        """Gateway: check the frame's header and hand the client's bytes to the handle, here on the loop.

        There is nothing to decode: the header check takes microseconds, less than the codec-pool
        hop (a submit, a thread wake-up, the GIL handed over and back) it replaces, and the handle's
        latest-wins slot drops a superseded frame as the decode slot would. A bad frame raises for
        the reader's error path, no longer tracked.
        """
        try:
            fmt, w, h = check_header(data, max_pixels=self.settings.max_pixels, size=size)
            self.live.arrivals.decoded(seq, timing.clock())
            dropped = self.handle.submit_encoded(bytes(data), seq, ts, fmt, w, h)
        except DitstreamError:
            self.live.arrivals.depart(seq)
            raise
        if dropped:
            self.live.frame_dropped()
        self.on_good()

    def _decode_pending(self) -> None:
        """Codec thread: decode the stream's oldest waiting frame and offer it to the engine directly.

        Neither the frame nor its result goes back through the event loop (no loop wake-up per
        frame); only an error does. At most one of these runs per stream, so frames stay in order.
        Must never raise: it runs in the codec pool.
        """
        while True:
            with self._lock:
                job = self._queue.popleft() if self._queue else None
                if job is None:
                    self._scheduled = False
                    return
            data, seq, ts, size = job
            if self._ended:  # the client left while this frame waited: nothing to answer
                continue
            try:
                image = codec.decode(data, max_pixels=self.settings.max_pixels, size=size, fast=True)
                self.live.arrivals.decoded(seq, timing.clock())
                if self.handle.submit(image, seq, ts):
                    self.live.frame_dropped()
                self.on_good()
            except DitstreamError as exc:  # bad input; or the stream closed meanwhile (nobody to tell)
                if not self._ended:
                    self._call_loop(self.on_error, seq, ts, exc)
            except Exception:  # a bug, not bad input: loud in the log, and the client gets 1011
                logger.exception("unexpected error decoding a frame")
                self._call_loop(self.on_error, seq, ts, DitstreamError("internal error while handling the message"))

    def _call_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self.live.loop.call_soon_threadsafe(fn, *args)
