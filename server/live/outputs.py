"""A live stream's outputs from the server: restreams (RTMP, SRT) and recordings (MP4), each encoded by
PyAV on its own thread (``outputs_mux.py``), off the stream's path.

``LiveSession.leaving`` — the moment each output frame leaves the server, whatever the transport —
hands the frame to ``SessionOutputs.feed``, which never blocks: every output has a mailbox of
``QUEUE_FRAMES`` frames, and a frame arriving at a full mailbox pushes the oldest out (counted as
dropped). A slow or stuck receiver thus costs the stream nothing; its own output drops frames, and
one that takes no data for ``STALL_S`` is ``failed`` (its thread is left to the network's own
timeouts, holding nothing the stream needs).

States: ``connecting`` (opened, no frame written yet: the connection is made at the first frame),
``live``, ``failed`` (with ``reason``), ``ended`` (deleted, or its session ended). The policy that
decides what an output may be is ``outputs_policy.py``; the routes are ``server/api/outputs.py``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from ditstream.engine.errors import OverloadedError
from ditstream.engine.types import StreamOutput
from ditstream.server import codec
from ditstream.server.errors import NotFoundError
from ditstream.server.live.outputs_mux import Muxer
from ditstream.server.live.outputs_policy import OutputTarget
from ditstream.server.settings import Settings

logger = logging.getLogger(__name__)

#: Frames waiting for an output's encoder; a newer frame pushes the oldest out.
QUEUE_FRAMES = 2
#: Seconds a write (or the connection) may hang before the output counts as failed.
STALL_S = 10.0
#: Seconds the bitrate is measured over.
BITRATE_WINDOW_S = 2.0
#: Finished outputs (failed, ended) a session keeps listing, beyond its active ones.
KEEP_FINISHED = 8


@dataclass(frozen=True)
class Pending:
    """A frame for an output: pixels (in process) or the coded bytes (decoded on the output's thread)."""

    image: np.ndarray | None
    data: bytes | None
    t: float  # monotonic time it left the server


class Output:
    """One output: its mailbox, its thread and what ``GET`` shows. ``feed``/``stop``/``snapshot`` are
    called from the event loop, everything else runs on the output's thread."""

    def __init__(self, target: OutputTarget, settings: Settings, session: str) -> None:
        self.id = "o" + secrets.token_hex(6)
        self.target = target
        self.session = session
        self._settings = settings
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.state = "connecting"
        self.reason: str | None = None
        self.frames_sent = 0
        self.frames_dropped = 0
        self.size: tuple[int, int] | None = None
        self.created_at = time.time()
        self._busy_since: float | None = None
        self._sent: deque[tuple[float, int]] = deque()  # (time, bytes) of the last BITRATE_WINDOW_S
        self._thread = threading.Thread(target=self._run, name=f"ditstream-output-{self.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self.state in ("failed", "ended")

    # ------------------------------------------------------------------------------ loop side
    def feed(self, pending: Pending) -> None:
        """Never blocks: into the mailbox, the oldest pushed out when it is full."""
        with self._cond:
            if self._stopping:
                return
            if len(self._queue) >= QUEUE_FRAMES:
                self._queue.popleft()
                self.frames_dropped += 1
            self._queue.append(pending)
            self._cond.notify()

    def stop(self) -> None:
        """Finish: the frames already queued are written, then the container is closed (``ended``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        """What ``GET`` shows; a write hanging past ``STALL_S`` turns the output ``failed`` here."""
        busy = self._busy_since
        if busy is not None and not self.finished and time.monotonic() - busy > STALL_S:
            self._fail(f"stalled: the receiver took no data for {STALL_S:.0f} s")
        now = time.monotonic()
        with self._cond:  # the output's thread appends to ``_sent``
            window = [(t, n) for t, n in self._sent if now - t <= BITRATE_WINDOW_S]
        bitrate = round(sum(n for _, n in window) * 8 / BITRATE_WINDOW_S) if window else 0
        return {"id": self.id, "url": self.target.shown, "kind": self.target.kind, "state": self.state,
                "reason": self.reason, "frames_sent": self.frames_sent, "frames_dropped": self.frames_dropped,
                "bitrate_bps": bitrate if self.state == "live" else 0,
                "width": self.size[0] if self.size else None, "height": self.size[1] if self.size else None,
                "created_at": round(self.created_at, 3)}

    # ------------------------------------------------------------------------------ the output's thread
    def _next(self) -> Pending | None:
        """The next frame, or None once stopped with nothing left to write."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            return self._queue.popleft() if self._queue else None

    def _run(self) -> None:
        muxer: Muxer | None = None
        try:
            pending = self._next()
            if pending is None:  # stopped before any frame: a reserved recording stays no empty file
                if self.target.kind == "file":
                    os.unlink(self.target.url)
                self._end()
                return
            t0 = pending.t
            while pending is not None and not self.finished:
                image = pending.image if pending.image is not None else codec.decode(
                    pending.data or b"", max_pixels=self._settings.max_pixels)
                self._busy_since = time.monotonic()
                if muxer is None:
                    muxer = Muxer(self.target, self._settings.output_encoder, self._settings.output_bitrate,
                                  int(image.shape[1]), int(image.shape[0]))
                    self.size = (muxer.width, muxer.height)
                written = muxer.write(image, (pending.t - t0) * 1e3)
                self._wrote(written)
                pending = self._next()
            if muxer is not None and not self.finished:
                self._busy_since = time.monotonic()
                self._wrote(muxer.close(), frames=0)
            self._end()
        except Exception as exc:  # the network, the disk, the encoder: this output fails, the stream goes on
            self._fail(self.target.mask(f"{type(exc).__name__}: {exc}"))
            if muxer is not None:
                muxer.abandon()
        finally:
            self._busy_since = None

    def _wrote(self, size: int, frames: int = 1) -> None:
        now = time.monotonic()
        self._busy_since = None
        with self._cond:
            self.frames_sent += frames
            self._sent.append((now, size))
            while self._sent and now - self._sent[0][0] > BITRATE_WINDOW_S:
                self._sent.popleft()
        if self.state == "connecting":
            self.state = "live"
            logger.info("output %s of session %s is live: %s", self.id, self.session, self.target.shown)

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self.finished:
                return
            self.state, self.reason, self._stopping = "failed", reason, True
            self._queue.clear()
        logger.warning("output %s of session %s (%s) failed: %s", self.id, self.session, self.target.shown, reason)

    def _end(self) -> None:
        with self._cond:
            if not self.finished:
                self.state = "ended"
        logger.info("output %s of session %s ended (%d frames): %s", self.id, self.session, self.frames_sent,
                    self.target.shown)


class SessionOutputs:
    """The outputs of one live stream (owned by its ``LiveSession``): add, list, remove, feed, close."""

    def __init__(self, settings: Settings, session: str) -> None:
        self._settings = settings
        self.session = session
        self._outputs: dict[str, Output] = {}
        self.closed = False

    def add(self, target: OutputTarget) -> Output:
        """Start an output (its thread waits for the next frame); over ``max_outputs`` active: 429."""
        self.check_room()
        finished = [o.id for o in self._outputs.values() if o.finished]
        for stale in finished[:max(0, len(finished) - KEEP_FINISHED + 1)]:
            del self._outputs[stale]
        output = Output(target, self._settings, self.session)
        self._outputs[output.id] = output
        output.start()
        logger.info("output %s added to session %s: %s", output.id, self.session, target.shown)
        return output

    def check_room(self) -> None:
        """Room for one more active output, or 429 (``--max-outputs``)."""
        active = [o for o in self._outputs.values() if not o.finished]
        if len(active) >= self._settings.max_outputs:
            raise OverloadedError(f"session {self.session} has {len(active)} outputs, the limit (--max-outputs)",
                                  retry_after=self._settings.retry_after_s, reason="outputs")

    def get(self, output_id: str) -> Output:
        found = self._outputs.get(output_id)
        if found is None:
            raise NotFoundError(f"no output {output_id!r} in session {self.session!r}", field="output")
        return found

    def remove(self, output_id: str) -> Output:
        """Stop one (its queued frames written, its container closed) and forget it; the caller joins it."""
        output = self.get(output_id)
        output.stop()
        del self._outputs[output_id]
        return output

    def list(self) -> list[dict[str, Any]]:
        return [o.snapshot() for o in self._outputs.values()]

    def feed(self, out: StreamOutput) -> None:
        """Event loop, for each output frame leaving the server: to every output, never blocking."""
        if not self._outputs:
            return
        image = out.image
        data = out.encoded.data if image is None and out.encoded is not None else None
        if image is None and data is None:
            return
        pending = Pending(image, data, time.monotonic())
        for output in self._outputs.values():
            if not output.finished:
                output.feed(pending)

    def close(self) -> None:
        """The session ended: every output finishes (queued frames written, containers closed)."""
        self.closed = True
        for output in self._outputs.values():
            output.stop()
