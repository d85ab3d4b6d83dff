"""Stream a webcam, a video file or a built-in test pattern to ``/v1/stream`` and get frames back.

Speaks the wire protocol only (``docs/protocol.md``); imports neither ``engine`` nor ``server``.
Sources: ``pattern`` (a red circle moving on white, no dependencies), ``webcam`` / ``webcam:N`` (OpenCV), or
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
import math
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------- sources
#: The test pattern: a red circle moving on a white background, in the demo model's palette
#: (``engine/demo/dataset.py``), i.e. something the demo model was trained on; the browser page draws
#: the same. With the demo's default prompt ("a blue circle on a white background") img2img recolours it.
PATTERN_COLOUR = (220, 40, 40)
PATTERN_BACKGROUND = (245, 245, 245)
#: Circle radius as a fraction of the shorter side (the demo data: 0.16-0.30).
PATTERN_RADIUS = 0.22


def pattern_position(width: int, height: int, t_ms: float) -> tuple[float, float, float]:
    """Centre ``(cx, cy)`` and radius of the pattern's circle at ``t_ms``: a Lissajous path that
    keeps the whole circle inside the frame (the same formula as ``clients/web/app.js``)."""
    r = PATTERN_RADIUS * min(width, height)
    cx = width / 2 + math.cos(t_ms / 700) * (width / 2 - r) * 0.9
    cy = height / 2 + math.sin(t_ms / 450) * (height / 2 - r) * 0.9
    return cx, cy, r


def pattern_frame(width: int, height: int, t_ms: float) -> np.ndarray:
    """One frame of the test pattern (anti-aliased edge), uint8 (H, W, 3)."""
    cx, cy, r = pattern_position(width, height, t_ms)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    alpha = np.clip(r - np.hypot(x - cx, y - cy) + 0.5, 0.0, 1.0)[..., None]
    img = alpha * np.array(PATTERN_COLOUR, np.float32) + (1 - alpha) * np.array(PATTERN_BACKGROUND, np.float32)
    return np.round(img).astype(np.uint8)


def pattern_frames(width: int, height: int, fps: float = 30.0) -> Iterator[np.ndarray]:
    """The moving test pattern (``pattern_frame``) at ``fps`` frames per second of pattern time, forever."""
    t = 0
    while True:
        yield pattern_frame(width, height, t * 1000.0 / fps)
        t += 1


#: How to get OpenCV (what a webcam needs), named in the error when it is missing.
WEBCAM_EXTRA = "pip install 'ditstream[webcam]'  (headless OpenCV)"


class SourceError(RuntimeError):
    """A video source that cannot be opened: missing file, no camera, or no library to read it."""


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise SourceError(f"reading a webcam needs OpenCV: {WEBCAM_EXTRA}") from exc
    return cv2


def capture_frames(target: int | str, loop: bool = False) -> Iterator[np.ndarray]:
    """RGB frames from an OpenCV capture: a camera index (webcam) or a video file, the same code path.

    The capture is opened here, not on the first ``next()``, so a missing camera fails at once.
    """
    cv2 = _import_cv2()
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        what = f"camera {target}" if isinstance(target, int) else repr(target)
        raise SourceError(f"cannot open {what} with OpenCV")
    return _read_capture(cv2, cap, target, loop)


def _read_capture(cv2: Any, cap: Any, target: int | str, loop: bool) -> Iterator[np.ndarray]:
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                if loop and isinstance(target, str):
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    continue
                return
            yield bgr[:, :, ::-1]
    finally:
        cap.release()


def _av_frames(path: str, loop: bool) -> Iterator[np.ndarray]:
    import av

    while True:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        if not loop:
            return


def open_source(source: str, width: int, height: int, loop: bool = True) -> Iterator[np.ndarray]:
    """Frames of ``source`` fitted to (width, height)."""
    if source == "pattern":
        frames: Iterator[np.ndarray] = pattern_frames(width, height)
    elif source == "webcam" or source.startswith("webcam:"):
        index = source.partition(":")[2] or "0"
        if not index.isdigit():
            raise SourceError(f"webcam index must be a number, got {source!r}")
        frames = capture_frames(int(index), loop=False)
    else:
        if not Path(source).is_file():
            raise SourceError(f"{source!r} is not 'pattern', 'webcam[:N]' or an existing video file")
        try:
            frames = capture_frames(source, loop)
        except SourceError as exc:
            if "needs OpenCV" not in str(exc):
                raise
            try:
                import av  # noqa: F401
            except ImportError:
                raise SourceError(f"reading a video file needs OpenCV or PyAV: {WEBCAM_EXTRA}") from exc
            frames = _av_frames(source, loop)
    return (fit(f, width, height) for f in frames)


# ---------------------------------------------------------------------------------------- sinks
class FolderSink:
    """Writes each output as ``frame_<seq>.jpg`` (the JPEG the server sent, not re-encoded)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def __call__(self, header: dict[str, Any], jpeg: bytes) -> None:
        (self.path / f"frame_{header['seq']:06d}.jpg").write_bytes(jpeg)

    def close(self) -> None:
        pass


class VideoSink:
    """Writes outputs to a video file with PyAV (H.264/MPEG-4 by extension)."""

    def __init__(self, path: Path, fps: float) -> None:
        import av

        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("mpeg4" if path.suffix == ".avi" else "libx264", rate=round(fps))
        self.stream.pix_fmt = "yuv420p"
        self.started = False

    def __call__(self, header: dict[str, Any], jpeg: bytes) -> None:
        import av

        img = decode_jpeg(jpeg)
        if not self.started:
            self.stream.width, self.stream.height = img.shape[1] // 2 * 2, img.shape[0] // 2 * 2
            self.started = True
        img = img[: self.stream.height, : self.stream.width]
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


class CvVideoSink:
    """Writes outputs to a video file with OpenCV (``ditstream[webcam]``) when PyAV is not installed."""

    def __init__(self, path: Path, fps: float) -> None:
        self.cv2 = _import_cv2()
        self.path, self.fps = path, fps
        self.writer: Any = None

    def __call__(self, header: dict[str, Any], jpeg: bytes) -> None:
        img = decode_jpeg(jpeg)
        if self.writer is None:
            fourcc = self.cv2.VideoWriter_fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
            self.writer = self.cv2.VideoWriter(str(self.path), fourcc, max(1.0, self.fps),
                                               (img.shape[1], img.shape[0]))
            if not self.writer.isOpened():
                raise SourceError(f"OpenCV cannot write {str(self.path)!r}")
        self.writer.write(np.ascontiguousarray(img[:, :, ::-1]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


class WindowSink:
    """Shows outputs in an OpenCV window."""

    def __call__(self, header: dict[str, Any], jpeg: bytes) -> None:
        import cv2

        cv2.imshow("ditstream", decode_jpeg(jpeg)[:, :, ::-1])
        cv2.waitKey(1)

    def close(self) -> None:
        import cv2

        cv2.destroyAllWindows()


def open_sink(out: str | None, show: bool, fps: float) -> list[Any]:
    sinks: list[Any] = []
    if show:
        sinks.append(WindowSink())
    if out:
        path = Path(out)
        if path.suffix.lower() in (".mp4", ".mkv", ".avi", ".mov"):
            try:
                import av  # noqa: F401

                sinks.append(VideoSink(path, fps))
            except ImportError:
                sinks.append(CvVideoSink(path, fps))
        else:
            sinks.append(FolderSink(path))
    return sinks


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


async def run_stream(url: str, frames: Iterator[np.ndarray], *, config: dict[str, Any] | None = None,
                     fps: float = 30.0, max_frames: int | None = None, seconds: float | None = None,
                     api_key: str | None = None, max_in_flight: int = 2, quality: int = 85,
                     on_output: Callable[[dict[str, Any], bytes], None] | None = None,
                     report: Callable[[StreamStats], None] | None = None, report_every: float = 1.0) -> StreamStats:
    """Send ``frames`` at ``fps`` (at most ``max_in_flight`` unanswered), collect outputs, return stats."""
    import websockets

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    stats = StreamStats()
    async with websockets.connect(url, additional_headers=headers, max_size=None, compression=None,
                                  subprotocols=["ditstream"]) as ws:  # type: ignore[list-item]
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"server refused the stream: {ready}")
        stats.ready = ready
        txt2img = (config or {}).get("mode") == "txt2img"
        if config:
            await ws.send(json.dumps({"type": "config", **config}))
        last_answered = -1
        done_sending = asyncio.Event()
        stats.started = time.perf_counter()

        async def receiver() -> None:
            nonlocal last_answered
            async for msg in ws:
                now = time.perf_counter()
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m.get("type") == "error":
                        stats.errors.append(m)
                        logger.warning("server error: %s: %s", m.get("code"), m.get("message"))
                        if isinstance(m.get("seq"), int):  # a frame whose model call failed: answered all the same
                            last_answered = max(last_answered, m["seq"])
                    continue
                header, jpeg = unpack_frame(msg)
                last_answered = max(last_answered, header["seq"])
                stats.received += 1
                stats.seqs.append(header["seq"])
                stats.skipped += bool(header.get("skipped"))
                if not txt2img and header.get("ts") is not None:
                    stats.latencies_ms.append(now * 1e3 - header["ts"])
                stats.server_ms.append(header.get("timings", {}).get("server_ms", float("nan")))
                stats.first_output = stats.first_output or now
                stats.last_output = now
                if on_output is not None:
                    on_output(header, jpeg)
                if txt2img and max_frames is not None and stats.received >= max_frames:
                    done_sending.set()

        async def sender() -> None:
            period = 1.0 / fps
            next_t = time.perf_counter()
            seq = 0
            try:
                while not txt2img:
                    if max_frames is not None and seq >= max_frames:
                        return
                    if seconds is not None and time.perf_counter() - stats.started >= seconds:
                        return
                    next_t += period
                    await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
                    if seq - 1 - last_answered >= max_in_flight:
                        continue  # back-pressure: skip this tick (latest wins at the source too)
                    try:
                        image = next(frames)
                    except StopIteration:
                        return
                    data = await asyncio.to_thread(encode_jpeg, image, quality)
                    await ws.send(pack_frame({"seq": seq, "ts": time.perf_counter() * 1e3}, data))
                    seq += 1
                    stats.sent += 1
                if seconds is not None:
                    await asyncio.sleep(seconds)
                else:
                    await done_sending.wait()
            finally:
                done_sending.set()

        async def reporter() -> None:
            while report is not None:
                await asyncio.sleep(report_every)
                report(stats)

        recv_task = asyncio.create_task(receiver())
        rep_task = asyncio.create_task(reporter())
        await sender()
        # Let the last answers arrive (the server answers every frame it did not drop).
        deadline = time.perf_counter() + 5.0
        while not txt2img and last_answered < stats.sent - 1 and time.perf_counter() < deadline \
                and not recv_task.done():
            await asyncio.sleep(0.01)
        rep_task.cancel()
        recv_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await recv_task
    return stats
