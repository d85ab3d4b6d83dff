"""A live stream's outputs from the server: restreams (RTMP, SRT) and recordings (MP4), each encoded by
PyAV in a process of its own (``outputs_child.py``: FFmpeg connecting, writing or encoding never holds
this process's GIL), fed by a thread of its own, off the stream's path.

``LiveSession.leaving`` — the moment each output frame leaves the server, whatever the transport —
hands the frame to ``SessionOutputs.feed``, which never blocks: every output has a mailbox of
``QUEUE_FRAMES`` frames, and a frame arriving at a full mailbox pushes the oldest out (counted as
dropped). The output's thread writes the mailbox's frames into its child's stdin; a second thread
reads the child's reports. A slow or stuck receiver thus costs the stream nothing: its output drops
frames, and one that makes no progress for ``STALL_S`` is ``failed`` and its process killed.

States: ``connecting`` (added; the connection is made with the first frame), ``live``, ``failed``
(with ``reason``), ``ended`` (deleted, or its session ended). The policy that decides what an
output may be is ``outputs_policy.py``; the routes are ``server/api/outputs.py``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from ditstream.engine.errors import OverloadedError
from ditstream.engine.types import StreamOutput
from ditstream.server.errors import NotFoundError
from ditstream.server.live.outputs_child import FRAME
from ditstream.server.live.outputs_policy import OutputTarget
from ditstream.server.metrics import Metrics
from ditstream.server.settings import Settings

logger = logging.getLogger(__name__)

#: Frames waiting for an output's encoder; a newer frame pushes the oldest out.
QUEUE_FRAMES = 2
#: Seconds an output may hold frames it has not written (a receiver that takes no data, a connection
#: that never completes) before it counts as failed and its process is killed.
STALL_S = 10.0
#: Seconds an output gets to finish writing (flush, close) once stopped, before it is killed.
FINISH_S = 10.0
#: Seconds the bitrate is measured over.
BITRATE_WINDOW_S = 2.0
#: Finished outputs (failed, ended) a session keeps listing, beyond its active ones.
KEEP_FINISHED = 8
CHILD = [sys.executable, "-m", "ditstream.server.live.outputs_child"]


@dataclass(frozen=True)
class Pending:
    """A frame for an output: uint8 (H, W, 3) RGB and the monotonic time it left the server."""

    image: np.ndarray
    t: float


class Output:
    """One output: its mailbox, its process and two threads, and what ``GET`` shows. ``feed``,
    ``stop`` and ``snapshot`` are called from the event loop; the rest runs on the output's threads."""

    def __init__(self, target: OutputTarget, settings: Settings, session: str, metrics: Metrics | None = None) -> None:
        self.id = "o" + secrets.token_hex(6)
        self._metrics = metrics
        self.target = target
        self.session = session
        self._settings = settings
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._proc: subprocess.Popen | None = None
        self.state = "connecting"
        self.reason: str | None = None
        self.frames_sent = 0
        self.frames_dropped = 0
        self._given = 0  # frames handed to the child (its input), against ``frames_sent`` (its output)
        self._progress_at = time.monotonic()
        self.size: tuple[int, int] | None = None
        self.created_at = time.time()
        self._sent: deque[tuple[float, int]] = deque()  # (time, bytes) of the last BITRATE_WINDOW_S
        self._thread = threading.Thread(target=self._run, name=f"ditstream-output-{self.id}", daemon=True)

    def start(self) -> None:
        if self._metrics is not None:
            self._metrics.outputs_active.inc()
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self.state in ("failed", "ended")

    # ------------------------------------------------------------------------------ loop side
    def feed(self, pending: Pending) -> None:
        """Never blocks: into the mailbox, the oldest pushed out when it is full."""
        self._check_stall()
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
        """What ``GET`` shows."""
        self._check_stall()
        now = time.monotonic()
        with self._cond:  # the reader thread appends to ``_sent``
            window = [(t, n) for t, n in self._sent if now - t <= BITRATE_WINDOW_S]
        bitrate = round(sum(n for _, n in window) * 8 / BITRATE_WINDOW_S) if window else 0
        return {"id": self.id, "url": self.target.shown, "kind": self.target.kind, "state": self.state,
                "reason": self.reason, "frames_sent": self.frames_sent, "frames_dropped": self.frames_dropped,
                "bitrate_bps": bitrate if self.state == "live" else 0,
                "width": self.size[0] if self.size else None, "height": self.size[1] if self.size else None,
                "created_at": round(self.created_at, 3)}

    def _check_stall(self) -> None:
        """Frames handed over and none written for ``STALL_S``: failed, its process killed."""
        if not self.finished and self._given > self.frames_sent and time.monotonic() - self._progress_at > STALL_S:
            self._fail(f"stalled: no frame written for {STALL_S:g} s (the receiver takes no data, or the "
                       f"connection never completed)")

    # ------------------------------------------------------------------------------ the writer thread
    def _next(self) -> Pending | None:
        """The next frame, or None once stopped with nothing left to write."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            return self._queue.popleft() if self._queue else None

    def _run(self) -> None:
        reader: threading.Thread | None = None
        try:
            pending = self._next()
            if pending is None:  # stopped before any frame: a reserved recording stays no empty file
                if self.target.kind == "file":
                    os.unlink(self.target.url)
                self._end()
                return
            proc = self._spawn()
            reader = threading.Thread(target=self._read, args=(proc,), name=f"ditstream-output-{self.id}-reports",
                                      daemon=True)
            reader.start()
            t0 = pending.t
            while pending is not None and not self.finished:
                self._give(proc, pending, t0)
                pending = self._next()
            proc.stdin.close()  # type: ignore[union-attr]  # end of input: the child flushes and closes
            proc.wait(FINISH_S)
        except subprocess.TimeoutExpired:
            self._fail(f"did not finish writing within {FINISH_S:.0f} s of its end")
        except OSError as exc:  # the child died (killed when stalled, or failed): the reader says why
            if self._proc is None:
                self._fail(f"cannot start the encoder process: {exc}")
        except Exception as exc:  # a bug: loud in the log, and the output says so instead of "ended"
            logger.exception("output %s of session %s broke", self.id, self.session)
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._reap(reader)

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(CHILD, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._proc = proc
        s = self._settings
        config = {"target": asdict(self.target), "encoder": s.output_encoder, "bitrate": s.output_bitrate}
        _write_all(proc, json.dumps(config).encode() + b"\n")
        return proc

    def _give(self, proc: subprocess.Popen, pending: Pending, t0: float) -> None:
        """One frame into the child's input (blocks while the child is busy: this thread only)."""
        image = np.ascontiguousarray(pending.image)
        height, width = int(image.shape[0]), int(image.shape[1])
        if self._given == self.frames_sent:  # nothing outstanding: the stall clock starts now
            self._progress_at = time.monotonic()
        self._given += 1
        _write_all(proc, FRAME.pack((pending.t - t0) * 1e3, width, height))
        _write_all(proc, memoryview(image).cast("B"))
        if self.size is None:
            self.size = (width - width % 2, height - height % 2)

    def _reap(self, reader: threading.Thread | None) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None and self.finished:
            proc.kill()
        if reader is not None:
            reader.join(FINISH_S)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._end()

    # ------------------------------------------------------------------------------ the reader thread
    def _read(self, proc: subprocess.Popen) -> None:
        """The child's reports → this output's state and counters; its exit without one is a failure."""
        assert proc.stdout is not None
        final = False
        for line in proc.stdout:
            report = json.loads(line)
            if report["event"] == "wrote":
                self._wrote(int(report["bytes"]), int(report["frames"]))
            elif report["event"] == "failed":
                self._fail(str(report["reason"]))
                final = True
            elif report["event"] == "ended":
                final = True
        if not final and not self.finished:
            self._fail(f"the encoder process exited ({proc.wait()}) without a word")

    def _wrote(self, size: int, frames: int) -> None:
        now = time.monotonic()
        with self._cond:
            self._progress_at = now
            self.frames_sent += frames
            self._sent.append((now, size))
            while self._sent and now - self._sent[0][0] > BITRATE_WINDOW_S:
                self._sent.popleft()
        if self.state == "connecting" and frames:
            self.state = "live"
            logger.info("output %s of session %s is live: %s", self.id, self.session, self.target.shown)

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self.finished:
                return
            self.state, self.reason, self._stopping = "failed", reason, True
            self._queue.clear()
            self._cond.notify()
        self._finished_as("failed")
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # ours, by its handle: unblocks the writer (broken pipe) and the reader (EOF)
        logger.warning("output %s of session %s (%s) failed: %s", self.id, self.session, self.target.shown, reason)

    def _end(self) -> None:
        with self._cond:
            if self.finished:
                return
            self.state = "ended"
        self._finished_as("ended")
        logger.info("output %s of session %s ended (%d frames): %s", self.id, self.session, self.frames_sent,
                    self.target.shown)

    def _finished_as(self, outcome: str) -> None:
        """Once, at the first move to a finished state (the caller made it, under the lock)."""
        if self._metrics is not None:
            self._metrics.outputs_active.dec()
            self._metrics.outputs_finished.labels(outcome).inc()


def _write_all(proc: subprocess.Popen, data: bytes | memoryview) -> None:
    """All of ``data`` into the child's stdin (a raw pipe may take part of a write)."""
    assert proc.stdin is not None
    view = memoryview(data)
    while view:
        n = proc.stdin.write(view)
        view = view[n or 0:]


class SessionOutputs:
    """The outputs of one live stream (owned by its ``LiveSession``): add, list, remove, feed, close."""

    def __init__(self, settings: Settings, session: str, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self.session = session
        self._outputs: dict[str, Output] = {}
        self.closed = False

    def add(self, target: OutputTarget) -> Output:
        """Start an output (its thread waits for the next frame); over ``max_outputs`` active: 429."""
        self.check_room()
        finished = [o.id for o in self._outputs.values() if o.finished]
        for stale in finished[:max(0, len(finished) - KEEP_FINISHED + 1)]:
            del self._outputs[stale]
        output = Output(target, self._settings, self.session, self._metrics)
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
        """Event loop, for each output frame leaving the server: to every output, never blocking. (Only
        the in-process engine's outputs come here, always pixels: a gateway refuses outputs.)"""
        if not self._outputs or out.image is None:
            return
        pending = Pending(out.image, time.monotonic())
        for output in self._outputs.values():
            if not output.finished:
                output.feed(pending)

    def close(self) -> None:
        """The session ended: every output finishes (queued frames written, containers closed)."""
        self.closed = True
        for output in self._outputs.values():
            output.stop()
