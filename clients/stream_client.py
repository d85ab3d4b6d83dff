"""Stream a webcam, a video file or a built-in test pattern to ``/v1/stream`` and get frames back.

Speaks the wire protocol only (``docs/protocol.md``); imports neither ``engine`` nor ``server``.
Sources and sinks are in ``media.py``: ``pattern`` (a red circle moving on white, no dependencies), ``webcam`` / ``webcam:N`` (OpenCV), or
a video file (OpenCV, else PyAV). Outputs can be shown in a window (OpenCV), written as JPEG files
to a folder, or written to a video file (PyAV or OpenCV).

Flow control: at most ``max_in_flight`` frames are unanswered at any time; outputs come back in
order and a frame the server dropped (latest wins) is older than the next one answered, so
"in flight" is simply ``last sent seq − last answered seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- framing
def pack_frame(header: dict[str, Any], image: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + image


def unpack_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack_from(">I", data)
    return json.loads(data[4 : 4 + n]), data[4 + n :]


def encode_jpeg(image: np.ndarray, quality: int = 85, subsampling: str = "420") -> bytes:
    """uint8 (H, W, 3) RGB → JPEG, chroma 4:2:0 by default.

    4:2:0 is what browsers' ``canvas.toBlob`` and OpenCV send and what the server sends back; it is
    ~40 % smaller than 4:4:4 and the server decodes it ~40 % faster (``docs/benchmarks.md``).
    """
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB",
                                  colorsubsampling=subsampling)


def decode_jpeg(data: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop to the aspect ratio of (width, height), then resize (what the browser page does)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    cw, ch = round(width / scale), round(height / scale)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    from PIL import Image

    return np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR))


# ---------------------------------------------------------------------------------------- client
@dataclass
class StreamStats:
    """What one run measured; latencies are glass-to-glass (send → output received), in ms."""

    sent: int = 0
    received: int = 0
    skipped: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    started: float = 0.0
    first_output: float = 0.0
    last_output: float = 0.0
    ready: dict[str, Any] = field(default_factory=dict)
    #: Streams resumed after a 1012/1013 close, and the close codes that asked for it.
    reconnects: int = 0
    close_codes: list[int] = field(default_factory=list)

    @property
    def fps(self) -> float:
        span = self.last_output - self.first_output
        return (self.received - 1) / span if self.received > 1 and span > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> str:
        return (f"sent {self.sent}, received {self.received} ({self.skipped} skipped), {self.fps:.1f} fps, "
                f"glass-to-glass p50 {self.percentile(50):.1f} ms p99 {self.percentile(99):.1f} ms, "
                f"server p50 {float(np.median(self.server_ms)) if self.server_ms else float('nan'):.1f} ms")


#: Close codes after which the stream resumes by itself: 1012 (service restart: the server is being
#: replaced) and 1013 (try again later: full or shutting down).
RECONNECT_CODES = frozenset({1012, 1013})


@dataclass(frozen=True)
class Reconnect:
    """How a stream closed with a ``RECONNECT_CODES`` code resumes: up to ``attempts`` tries, the n-th
    after ``min(max_delay_s, first_delay_s * 2**n)`` s (times 0.5–1, so that a fleet's clients do not
    all come back at once). Each try opens a new stream at the same URL (whichever server it reaches
    now) with the same config; frames go on with the next seq."""

    attempts: int = 8
    first_delay_s: float = 0.1
    max_delay_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2**attempt) * random.uniform(0.5, 1.0)


class StreamControl(Protocol):
    """Something that changes a running stream's config from outside (``osc.OscControl``).

    ``start`` is awaited once the stream is open, with its ``ready`` message and ``send``, which sends
    a ``config`` change at once (event loop only) and keeps it for the opening config of a reconnect;
    ``output`` is called after each output frame (the clock that changes are coalesced to); ``close``
    when the stream ends."""

    async def start(self, ready: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None: ...

    def output(self) -> None: ...

    def close(self) -> None: ...


class StreamRefused(RuntimeError):
    """The server answered the open with an error instead of ``ready`` (e.g. ``overloaded``, 1013)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(f"server refused the stream: {answer}")
        self.answer = answer


async def run_stream(url: str, frames: Iterator[np.ndarray], *, config: dict[str, Any] | None = None,
                     fps: float = 30.0, max_frames: int | None = None, seconds: float | None = None,
                     api_key: str | None = None, max_in_flight: int = 2, quality: int = 85,
                     on_output: Callable[[dict[str, Any], bytes], None] | None = None,
                     report: Callable[[StreamStats], None] | None = None, report_every: float = 1.0,
                     reconnect: Reconnect | None = Reconnect(), control: StreamControl | None = None) -> StreamStats:
    """Send ``frames`` at ``fps`` (at most ``max_in_flight`` unanswered), collect outputs, return stats.

    A stream the server closes with 1012/1013 resumes by itself (``reconnect``; ``None``: never); the
    first open is not retried (a server that is not there or refuses is an error at once). ``frames``
    is read in a worker thread (a webcam or an NDI receiver blocks until its next frame). ``control``
    changes the config while the stream runs (``--osc-port``)."""
    import websockets

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    run = _StreamRun(frames, config=config, fps=fps, max_frames=max_frames, seconds=seconds,
                     max_in_flight=max_in_flight, quality=quality, on_output=on_output, control=control)

    async def open_stream() -> Any:
        ws = await websockets.connect(url, additional_headers=headers, max_size=None, compression=None,
                                      subprotocols=["ditstream"])  # type: ignore[list-item]
        try:
            ready = json.loads(await ws.recv())
            if ready.get("type") != "ready":
                raise StreamRefused(ready)
            if run.config:  # the config asked for, with every change sent since (a reconnect keeps them)
                await ws.send(json.dumps({"type": "config", **run.config}))
        except BaseException:
            await ws.close()
            raise
        return ws, ready

    await run.run(open_stream, reconnect, report, report_every)
    return run.stats


class _StreamRun:
    """One stream's send and receive loops, and what they share across the connections that carry it:
    the stats, the next seq and the last answered seq (flow control)."""

    def __init__(self, frames: Iterator[np.ndarray], *, config: dict[str, Any] | None, fps: float,
                 max_frames: int | None, seconds: float | None, max_in_flight: int, quality: int,
                 on_output: Callable[[dict[str, Any], bytes], None] | None,
                 control: StreamControl | None) -> None:
        self.ws: Any = None
        #: The config asked for so far: the opening one with every change sent since.
        self.config: dict[str, Any] = dict(config or {})
        self.frames, self.txt2img, self.fps = frames, self.config.get("mode") == "txt2img", fps
        self.max_frames, self.seconds, self.max_in_flight, self.quality = max_frames, seconds, max_in_flight, quality
        self.on_output = on_output
        self.control = control
        self._config_sends: set[asyncio.Task] = set()
        self.stats = StreamStats()
        self.last_answered = -1
        self.next_seq = 0
        self.done_sending = asyncio.Event()
        self.connected = asyncio.Event()

    async def run(self, open_stream: Callable[[], Any], reconnect: Reconnect | None,
                  report: Callable[[StreamStats], None] | None, report_every: float) -> None:
        """Open, send until done (across reconnects), let the last answers arrive, then stop."""
        self.stats.started = time.perf_counter()
        self.ws, self.stats.ready = await open_stream()
        rep_task = asyncio.create_task(self._report(report, report_every))
        send_task = asyncio.create_task(self._send())
        try:
            if self.control is not None:
                self.connected.set()  # what the control sends from now on goes out at once
                await self.control.start(self.stats.ready, self.send_config)
            while True:
                self.connected.set()
                recv_task = asyncio.create_task(self._receive())
                await asyncio.wait({recv_task, send_task}, return_when=asyncio.FIRST_COMPLETED)
                if send_task.done():
                    send_task.result()
                    await self._last_answers(recv_task)
                    return
                self.connected.clear()
                code = self.ws.close_code
                closed_by = recv_task.exception()  # ConnectionClosedError for an unclean close
                if reconnect is None or code not in RECONNECT_CODES:
                    raise closed_by or await _closed(self.ws)
                self.ws = await self._reopen(open_stream, reconnect, code)
        finally:
            if self.control is not None:
                self.control.close()
            rep_task.cancel()
            send_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await send_task
            if self.ws is not None:
                await self.ws.close()

    async def _reopen(self, open_stream: Callable[[], Any], reconnect: Reconnect, code: int) -> Any:
        """A new stream after a 1012/1013 close: tries with backoff; frames unanswered on the old one
        never will be, so flow control starts afresh."""
        import websockets

        logger.info("stream closed (%s): reconnecting", code)
        self.stats.close_codes.append(code)
        for attempt in range(reconnect.attempts):
            await asyncio.sleep(reconnect.delay(attempt))
            try:
                ws, _ = await open_stream()
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                logger.info("reconnect %d failed: %r", attempt + 1, exc)
                continue
            except StreamRefused as exc:
                if exc.answer.get("code") != "overloaded":
                    raise
                logger.info("reconnect %d refused: %s", attempt + 1, exc.answer.get("message"))
                continue
            self.stats.reconnects += 1
            self.last_answered = self.next_seq - 1
            return ws
        raise ConnectionError(f"the stream closed ({code}) and {reconnect.attempts} reconnects failed")

    async def _last_answers(self, recv_task: asyncio.Task) -> None:
        """Let the last answers arrive (the server answers every frame it did not drop)."""
        deadline = time.perf_counter() + 5.0
        while not self.txt2img and self.last_answered < self.next_seq - 1 and time.perf_counter() < deadline \
                and not recv_task.done():
            await asyncio.sleep(0.01)
        recv_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await recv_task

    async def _receive(self) -> None:
        async for msg in self.ws:
            now = time.perf_counter()
            if isinstance(msg, str):
                self._on_text(json.loads(msg))
            else:
                self._on_frame(now, *unpack_frame(msg))

    def _on_text(self, m: dict[str, Any]) -> None:
        if m.get("type") == "error":
            self.stats.errors.append(m)
            logger.warning("server error: %s: %s", m.get("code"), m.get("message"))
            if isinstance(m.get("seq"), int):  # a frame whose model call failed: answered all the same
                self.last_answered = max(self.last_answered, m["seq"])

    def _on_frame(self, now: float, header: dict[str, Any], jpeg: bytes) -> None:
        stats = self.stats
        self.last_answered = max(self.last_answered, header["seq"])
        stats.received += 1
        stats.seqs.append(header["seq"])
        stats.skipped += bool(header.get("skipped"))
        if not self.txt2img and header.get("ts") is not None:
            stats.latencies_ms.append(now * 1e3 - header["ts"])
        stats.server_ms.append(header.get("timings", {}).get("server_ms", float("nan")))
        stats.first_output = stats.first_output or now
        stats.last_output = now
        if self.on_output is not None:
            self.on_output(header, jpeg)
        if self.control is not None:
            self.control.output()
        if self.txt2img and self.max_frames is not None and stats.received >= self.max_frames:
            self.done_sending.set()

    async def _send(self) -> None:
        """img2img: frames at ``fps`` until a limit; txt2img: the server pushes, so only wait."""
        try:
            if not self.txt2img:
                await self._send_frames()
            elif self.seconds is not None:
                await asyncio.sleep(self.seconds)
            else:
                await self.done_sending.wait()
        finally:
            self.done_sending.set()

    async def _send_frames(self) -> None:
        import websockets

        period = 1.0 / self.fps
        next_t = time.perf_counter()
        while True:
            if self.max_frames is not None and self.stats.sent >= self.max_frames:
                return
            if self.seconds is not None and time.perf_counter() - self.stats.started >= self.seconds:
                return
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            if self.next_seq - 1 - self.last_answered >= self.max_in_flight:
                continue  # back-pressure: skip this tick (latest wins at the source too)
            data = await asyncio.to_thread(self._next_jpeg)
            if data is None:
                return
            await self.connected.wait()
            with contextlib.suppress(websockets.ConnectionClosed):  # resumes on the next connection
                await self.ws.send(pack_frame({"seq": self.next_seq, "ts": time.perf_counter() * 1e3}, data))
                self.next_seq += 1
                self.stats.sent += 1

    def _next_jpeg(self) -> bytes | None:
        """The source's next frame as JPEG, or None at its end (a worker thread: sources may block)."""
        image = next(self.frames, None)
        return None if image is None else encode_jpeg(image, self.quality)

    def send_config(self, changes: dict[str, Any]) -> None:
        """Send a config change now (event loop only), and keep it for the opening config of a reconnect
        (while reconnecting it is only kept: the new stream opens with it)."""
        self.config.update(changes)
        if self.connected.is_set():
            task = asyncio.create_task(self._send_config(self.ws, {"type": "config", **changes}))
            self._config_sends.add(task)
            task.add_done_callback(self._config_sends.discard)

    @staticmethod
    async def _send_config(ws: Any, message: dict[str, Any]) -> None:
        import websockets

        with contextlib.suppress(websockets.ConnectionClosed):  # the reconnect's opening config has it
            await ws.send(json.dumps(message))

    async def _report(self, report: Callable[[StreamStats], None] | None, every: float) -> None:
        while report is not None:
            await asyncio.sleep(every)
            report(self.stats)



async def _closed(ws: Any) -> Exception:
    """The exception reading ``ws`` raises now that the server closed it (no reconnect)."""
    import websockets

    try:
        await ws.recv()
    except websockets.ConnectionClosed as exc:
        return exc
    return ConnectionError("the server closed the stream")
