"""Where a stream's frames come from and where its outputs go: the built-in pattern, a webcam or a
video file (one OpenCV capture path for both), an NDI source (``ndi.py``), and folder, video-file,
window and NDI sinks.

Speaks no protocol and imports neither ``engine`` nor ``server``; ``stream_client.py`` streams what
a source yields and hands each output to the sinks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ditstream.clients.stream_client import decode_jpeg, fit

logger = logging.getLogger(__name__)


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
    """Frames of ``source`` fitted to (width, height). An NDI source (``ndi:NAME``) has ``close()``."""
    if source.startswith("ndi:"):
        from ditstream.clients.ndi import NdiSource

        if not source[4:]:
            raise SourceError("ndi: needs the name of an NDI source, e.g. 'ndi:OBS' or 'ndi:MACHINE (OBS)'")
        return NdiSource(source[4:], width, height)
    if source == "pattern":
        frames: Iterator[np.ndarray] = pattern_frames(width, height)
    elif source == "webcam" or source.startswith("webcam:"):
        index = source.partition(":")[2] or "0"
        if not index.isdigit():
            raise SourceError(f"webcam index must be a number, got {source!r}")
        frames = capture_frames(int(index), loop=False)
    else:
        if not Path(source).is_file():
            raise SourceError(f"{source!r} is not 'pattern', 'webcam[:N]', 'ndi:NAME' or an existing video file")
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


def open_sink(out: str | None, show: bool, fps: float, ndi_out: str | None = None) -> list[Any]:
    """The sinks asked for: a window (``show``), a folder or video file (``out``), an NDI source (``ndi_out``)."""
    sinks: list[Any] = []
    if ndi_out:
        from ditstream.clients.ndi import NdiSink

        sinks.append(NdiSink(ndi_out, fps))
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


