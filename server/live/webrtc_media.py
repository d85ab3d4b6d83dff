"""Frames between aiortc and the engine: the published track into the engine handle, outputs out as tracks.

Input (``InputPump``): one task per published video track awaits aiortc's decoded frames and keeps
only the newest (latest wins before conversion, as on the WebSocket); one codec-pool job at a time per
stream converts it to RGB at the engine's current stream size (libswscale, in one pass) and offers it
to the engine handle. A slow engine thus never lets aiortc's frame queue grow into latency.

Output (``OutputTrack``): one per WHEP viewer. The session hands it each output image (``put``,
on the event loop); ``recv`` — aiortc's sender calls it — waits for the next one and returns it as a
``VideoFrame`` with a 90 kHz wall-clock timestamp. A viewer that reads slowly gets the newest image,
never a backlog. Imported only when the ``webrtc`` extra is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from ditstream.engine.errors import DitstreamError
from ditstream.server.engine_client import EngineStream
from ditstream.server.live import timing
from ditstream.server.live.session import LiveSession

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
TIME_BASE = Fraction(1, VIDEO_CLOCK)


class OutputTrack(MediaStreamTrack):
    """A video track that plays the newest output image of a session."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._image: np.ndarray | None = None
        self._new = asyncio.Event()
        self._t0 = time.monotonic()
        self._pts = -1

    def put(self, image: np.ndarray) -> None:
        """The next image to send (event loop only); an unsent one is replaced."""
        self._image = image
        self._new.set()

    async def recv(self) -> av.VideoFrame:
        while self._image is None:
            if self.readyState != "live":
                raise MediaStreamError
            self._new.clear()
            await self._new.wait()
        if self.readyState != "live":
            raise MediaStreamError
        image, self._image = self._image, None
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        self._pts = max(self._pts + 1, int((time.monotonic() - self._t0) * VIDEO_CLOCK))
        frame.pts, frame.time_base = self._pts, TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        self._new.set()  # a recv waiting for an image ends


def to_rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """A decoded frame as uint8 (height, width, 3) RGB, scaled if its size differs (blocking)."""
    if (frame.width, frame.height) != (width, height) or frame.format.name != "rgb24":
        frame = frame.reformat(width=width, height=height, format="rgb24")
    return frame.to_ndarray()


class InputPump:
    """Published frames → engine: receive on the loop, convert in the codec pool, newest only."""

    def __init__(self, live: LiveSession, handle: EngineStream, pool: Any,
                 on_error: Callable[[DitstreamError], None]) -> None:
        self.live = live  # numbers the frames and keeps their arrival times
        self.handle = handle
        self.pool = pool
        self.on_error = on_error  # called on the loop
        self.loop = live.loop
        self.paused = False  # txt2img: the engine takes empty frames from the ticker instead
        self._lock = threading.Lock()
        #: The newest frame not converted yet, with its arrival time.
        self._slot: tuple[av.VideoFrame, float] | None = None
        self._scheduled = False
        self._ended = False

    async def run(self, track: MediaStreamTrack) -> None:
        """Until the track ends (the publisher left) or the session closes (cancelled)."""
        try:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                if self.paused:
                    continue
                with self._lock:
                    replaced, self._slot = self._slot, (frame, timing.clock())
                    start, self._scheduled = not self._scheduled, True
                if replaced is not None:
                    self.live.frame_dropped()
                if start:
                    self.pool.submit(self._convert_pending)
        finally:
            self.stop()

    def stop(self) -> None:
        with self._lock:
            self._slot, self._ended = None, True

    def _convert_pending(self) -> None:
        """Codec thread: convert and submit the newest frame, until none is left. Never raises."""
        while True:
            with self._lock:
                job, self._slot = self._slot, None
                if job is None or self._ended:
                    self._scheduled = False
                    return
            frame, arrived = job
            seq = self.live.arrivals.arrive(None, arrived)
            try:
                cfg = self.handle.config  # the engine's own: frames match the size it runs now
                image = to_rgb(frame, cfg.width, cfg.height)
                self.live.arrivals.decoded(seq, timing.clock())
                if self.handle.submit(image, seq, time.time() * 1e3):
                    self.live.frame_dropped()
            except DitstreamError as exc:  # the stream closed meanwhile, or the engine died
                self.live.arrivals.depart(seq)
                if not self._ended:
                    self._call_loop(self.on_error, exc)
            except Exception:
                logger.exception("unexpected error converting a WebRTC frame")

    def _call_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self.loop.call_soon_threadsafe(fn, *args)
