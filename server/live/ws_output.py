"""A WebSocket stream's outputs on their way to the socket: the engine's ``notify`` starts a per-stream
encoder in the codec pool that drains the engine's bounded output queue in order, codes each output
as JPEG at the client's quality and hands it to the sender (``ws.WebSocketStream``, the only writer
to the socket), waking the event loop once per batch.

When every queued output is already the JPEG the client wants (a gateway relaying its worker's
bytes), the "encoder" only hands them on, on the notifying thread: no pool hop at all.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ditstream.engine.types import StreamOutput
from ditstream.server import codec
from ditstream.server.live import timing
from ditstream.server.live.session import LiveSession

logger = logging.getLogger(__name__)


class OutputEncoder:
    """Engine outputs → (output, JPEG bytes or None for a failed frame, encode seconds), in order."""

    def __init__(self, live: LiveSession, pool: Any, quality: int, wake: Callable[[], None]) -> None:
        self.live = live
        self.pool = pool
        self.max_pixels = live.settings.max_pixels
        #: JPEG quality the client asked for (``config`` ``quality``); read by the codec thread.
        self.quality = quality
        self.wake = wake  # thread-safe: wakes the sender on the loop
        #: Encoded outputs handed from the codec pool to the sender, in order; bounded like the
        #: engine's output queue, so a client that stops reading costs a fixed amount of memory.
        self.encoded: deque[tuple[StreamOutput, bytes | None, float]] = deque()
        self.limit = live.settings.output_queue_size
        self._lock = threading.Lock()
        self.scheduled = False
        self._again = False
        self._last_image: Any = None
        self._last_bytes = b""
        self._last_quality = -1

    def notify(self) -> None:
        """Engine thread, after each output: start (or re-arm) this stream's encoder in the codec pool.

        Encoding straight from here, instead of waking the event loop first, takes one thread hop
        off every frame's path. At most one encoder runs per stream, so outputs stay in order.
        Must never raise: it runs on the engine (or reader) thread.
        """
        try:
            with self._lock:
                if self.scheduled:
                    self._again = True
                    return
                self.scheduled = True
            if self._all_relayed():
                self._encode_pending()
            else:
                self.pool.submit(self._encode_pending)
        except Exception:  # pool shut down at exit
            logger.debug("encoder not scheduled", exc_info=True)
            with self._lock:
                self.scheduled = False
            self.wake()

    def _all_relayed(self) -> bool:
        """Every queued output needs no codec work: coded at the client's quality, or an in-band error."""
        handle, quality = self.live.handle, self.quality
        return handle is not None and handle.takes_encoded and all(
            out.error is not None or (out.encoded is not None and out.encoded.quality == quality)
            for out in handle.outputs.peek())

    def _code(self, out: StreamOutput) -> bytes | None:
        """The JPEG the client gets for ``out`` (None: its model call failed, an in-band error instead)."""
        quality = self.quality
        if out.error is not None:
            return None
        if out.encoded is not None and out.encoded.quality == quality:
            return out.encoded.data  # a worker's JPEG at the client's quality: relayed as it is
        if out.encoded is not None:  # coded before a quality change: once more, at the new one
            image = out.image if out.image is not None else codec.decode(out.encoded.data,
                                                                         max_pixels=self.max_pixels)
            return codec.encode(image, "jpeg", quality)
        if out.image is self._last_image and quality == self._last_quality:
            return self._last_bytes  # a skipped frame re-sends the same array
        data = codec.encode(out.image, "jpeg", quality)
        self._last_image, self._last_bytes, self._last_quality = out.image, data, quality
        return data

    def _encode_pending(self) -> None:
        """Codec thread: encode every queued output in order, hand them to the sender."""
        try:
            while True:
                handle = self.live.handle
                batch = handle.outputs.drain() if handle is not None else []
                for out in batch:
                    t0 = timing.clock()
                    data = self._code(out)
                    if len(self.encoded) >= self.limit:  # the client reads too slowly: drop oldest
                        dropped, _, _ = self.encoded.popleft()
                        self.live.frame_dropped(dropped.seq)
                    self.encoded.append((out, data, timing.clock() - t0))
                if batch:
                    self.wake()
                with self._lock:
                    if not self._again:
                        self.scheduled = False
                        break
                    self._again = False
            if handle is not None and handle.outputs.closed:
                self.wake()  # after the flag is down, so the sender sees a settled state
        except Exception:
            logger.exception("encoding failed")
            with self._lock:
                self.scheduled = False
            self.wake()
