"""The server's one definition of glass-to-glass time, and the arrival times it needs.

Glass-to-glass, as the server sees it: from the moment a frame (or a REST request) reached the server
to the moment its answer leaves it — a WebSocket output frame handed to the socket, a WebRTC output
handed to the viewers' video tracks, a REST response's images coded. The WebSocket header's
``server_ms``, ``ditstream_e2e_seconds`` and ``ditstream_server_overhead_seconds`` all read it, for
every transport; ``docs/protocol.md`` documents it once.

Every stamp comes from ``clock`` (``time.perf_counter``), read through this module so that a test
can hold it still.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

#: The clock of every arrival and departure stamp (seconds, monotonic).
clock = time.perf_counter

#: Arrival times kept for frames in flight (more than the engine can ever hold per stream).
MAX_TRACKED_FRAMES = 64


def glass_to_glass(received_at: float | None, sent_at: float, engine_total_s: float = 0.0,
                   encode_s: float = 0.0) -> float:
    """Seconds from a frame's arrival at the server to its answer leaving it.

    ``received_at`` is None when the arrival was not kept (over ``MAX_TRACKED_FRAMES`` frames in
    flight): then the engine's own time for the frame plus its encoding, a lower bound, stands in.
    """
    if received_at is None:
        return engine_total_s + encode_s
    return max(0.0, sent_at - received_at)


class Arrivals:
    """Arrival times of one stream's frames in flight, by ``seq``, and the next server-made ``seq``.

    Thread-safe: the WebSocket's reader and the WebRTC pump (a codec thread) stamp arrivals, the
    txt2img ticker numbers its frames, the output path takes them back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: seq -> [arrival, seconds from arrival to decoded (0 until decoded)]
        self._times: OrderedDict[int, list[float]] = OrderedDict()
        self._next = 0

    def arrive(self, seq: int | None, at: float) -> int:
        """Record a frame's arrival; ``seq`` None takes the next one (previous + 1). Returns the seq."""
        with self._lock:
            if seq is None:
                seq = self._next
            self._next = max(self._next, seq + 1)
            self._times[seq] = [at, 0.0]
            while len(self._times) > MAX_TRACKED_FRAMES:
                self._times.popitem(last=False)
            return seq

    def decoded(self, seq: int, at: float) -> None:
        """The frame is decoded (or converted) and offered to the engine: its decode time ends."""
        with self._lock:
            entry = self._times.get(seq)
            if entry is not None:
                entry[1] = at - entry[0]

    def depart(self, seq: int) -> tuple[float | None, float]:
        """The frame's arrival time (None if it was not kept) and decode seconds; forgotten now."""
        with self._lock:
            entry = self._times.pop(seq, None)
        return (None, 0.0) if entry is None else (entry[0], entry[1])

    def __contains__(self, seq: int) -> bool:
        with self._lock:
            return seq in self._times
