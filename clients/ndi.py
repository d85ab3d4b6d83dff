"""NDI in and out (extra ``ditstream[ndi]``: the ndi-python wheel carries the NDI runtime): the source
``ndi:NAME`` and the sink ``--ndi-out NAME`` of ``ditstream client stream``, so TouchDesigner,
Resolume or OBS send a stream its frames and take its outputs over the network, without capture.

Discovery is NDI's finder (mDNS) with this machine's own sources shown and 127.0.0.1 asked directly
(``extra_ips``), so a source on the same machine is found even where multicast is off. Frames are
converted with numpy from what NDI hands over (BGRX/BGRA, RGBX/RGBA or UYVY) to RGB, and sent as RGBX.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from ditstream.clients.media import SourceError
from ditstream.clients.stream_client import decode_jpeg, fit

logger = logging.getLogger(__name__)

#: How to get ndi-python, named in the error when it is missing.
NDI_EXTRA = "pip install 'ditstream[ndi]'"
#: Asked directly besides mDNS: this machine's own sources are found without multicast.
FIND_EXTRA_IPS = "127.0.0.1"
#: How long a source is looked for, and its first frame waited for.
FIND_TIMEOUT_S = 10.0
#: How long one finder looks before a fresh one takes over (``connect``).
FIND_ROUND_S = 0.3
#: A source that sends nothing for this long has its last frame sent again (the stream stays open
#: and a paused source is not an error); also the longest a read blocks, so a run ends promptly.
HOLD_S = 1.0

_init_lock = threading.Lock()
_initialised = False


def ndi_lib() -> Any:
    """The ``NDIlib`` module, initialised once (``SourceError`` without it or on an unsupported CPU)."""
    global _initialised
    try:
        import NDIlib
    except ImportError as exc:
        raise SourceError(f"NDI needs ndi-python: {NDI_EXTRA}") from exc
    with _init_lock:
        if not _initialised:
            if not NDIlib.initialize():
                raise SourceError("the NDI runtime did not start (NDIlib.initialize failed: is the CPU supported?)")
            _initialised = True
    return NDIlib


# ---------------------------------------------------------------------------------------- pixels
def uyvy_to_rgb(uyvy: np.ndarray) -> np.ndarray:
    """UYVY 4:2:2 ``(H, W, 2)`` (channel 0: U at even x, V at odd x; channel 1: Y) → RGB uint8 ``(H, W, 3)``.

    BT.709, limited range: what NDI sends at every size (Y 16–235, chroma 16–240)."""
    y = (uyvy[..., 1].astype(np.float32) - 16.0) * (255.0 / 219.0)
    chroma = uyvy[..., 0].astype(np.float32).reshape(uyvy.shape[0], -1, 2) - 128.0
    u = np.repeat(chroma[..., 0], 2, axis=1) * (255.0 / 224.0)
    v = np.repeat(chroma[..., 1], 2, axis=1) * (255.0 / 224.0)
    rgb = np.stack([y + 1.5748 * v, y - 0.1873 * u - 0.4681 * v, y + 1.8556 * u], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def to_rgb(ndi: Any, fourcc: Any, data: np.ndarray) -> np.ndarray:
    """An NDI video frame's pixels → RGB uint8 ``(H, W, 3)`` (a copy: NDI's buffer is freed after)."""
    if fourcc in (ndi.FOURCC_VIDEO_TYPE_BGRX, ndi.FOURCC_VIDEO_TYPE_BGRA):
        return np.ascontiguousarray(data[..., 2::-1])
    if fourcc in (ndi.FOURCC_VIDEO_TYPE_RGBX, ndi.FOURCC_VIDEO_TYPE_RGBA):
        return np.ascontiguousarray(data[..., :3])
    if fourcc == ndi.FOURCC_VIDEO_TYPE_UYVY:
        return uyvy_to_rgb(data)
    raise SourceError(f"NDI sent {fourcc}; expected BGRX/BGRA, RGBX/RGBA or UYVY")


def rgbx(rgb: np.ndarray) -> np.ndarray:
    """RGB ``(H, W, 3)`` → RGBX ``(H, W, 4)`` (X = 255), what the sender hands NDI."""
    out = np.full((*rgb.shape[:2], 4), 255, np.uint8)
    out[..., :3] = rgb
    return out


# ---------------------------------------------------------------------------------------- discovery
def source_matches(ndi_name: str, wanted: str) -> bool:
    """NDI names a source ``"MACHINE (NAME)"``: ``wanted`` is either the whole or the part in brackets."""
    return ndi_name == wanted or (ndi_name.endswith(f"({wanted})") and ndi_name[: -len(wanted) - 2].endswith(" "))


def connect(ndi: Any, name: str, timeout_s: float = FIND_TIMEOUT_S, color_format: Any = None) -> Any:
    """A receiver (full bandwidth; BGRX/BGRA unless ``color_format`` says otherwise: NDI converts with
    SIMD, faster than numpy) connected to the NDI source ``name``, or ``SourceError`` naming the
    sources that were found.

    Without mDNS (containers, CI), ``extra_ips`` is what finds sources on this machine, and every NDI
    process with a source listens on port 5960 (SO_REUSEPORT): the kernel hands a finder's connection
    to one of them, and that finder sees that process's sources only. So the search starts a fresh
    finder every ``FIND_ROUND_S``, which reaches each process in turn."""
    options = ndi.FindCreate()
    options.show_local_sources = True
    options.extra_ips = FIND_EXTRA_IPS
    deadline, seen = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline:
        finder = ndi.find_create_v2(options)
        if finder is None:
            raise SourceError("cannot start NDI discovery (NDIlib.find_create_v2 failed)")
        try:
            round_end = min(deadline, time.monotonic() + FIND_ROUND_S)
            while time.monotonic() < round_end:
                ndi.find_wait_for_sources(finder, 100)
                sources = ndi.find_get_current_sources(finder)
                seen |= {s.ndi_name for s in sources}
                found = next((s for s in sources if source_matches(s.ndi_name, name)), None)
                if found is not None:  # connected while the finder lives: it owns ``found``
                    return _receiver(ndi, found, color_format)
        finally:
            ndi.find_destroy(finder)
    raise SourceError(f"no NDI source {name!r} found in {timeout_s:g} s (found: {', '.join(sorted(seen)) or 'none'})")


def _receiver(ndi: Any, source: Any, color_format: Any) -> Any:
    options = ndi.RecvCreateV3()
    options.color_format = ndi.RECV_COLOR_FORMAT_BGRX_BGRA if color_format is None else color_format
    options.bandwidth = ndi.RECV_BANDWIDTH_HIGHEST
    receiver = ndi.recv_create_v3(options)
    if receiver is None:
        raise SourceError("cannot create an NDI receiver (NDIlib.recv_create_v3 failed)")
    ndi.recv_connect(receiver, source)  # copies the source
    return receiver


# ---------------------------------------------------------------------------------------- source
class NdiSource:
    """The frames of an NDI source, RGB fitted to (width, height), in the order NDI delivers them.

    ``next()`` blocks until the next frame (the stream client reads in a worker thread): a source
    slower than ``--fps`` paces the stream. Paused for ``HOLD_S``, it gives its last frame again."""

    def __init__(self, name: str, width: int, height: int, *, timeout_s: float = FIND_TIMEOUT_S) -> None:
        self.ndi = ndi_lib()
        self.name, self.width, self.height, self.timeout_s = name, width, height, timeout_s
        self.receiver = connect(self.ndi, name, timeout_s)
        self.last: np.ndarray | None = None
        self.held = 0

    def __iter__(self) -> NdiSource:
        return self

    def __next__(self) -> np.ndarray:
        if self.receiver is None:
            raise StopIteration
        ndi = self.ndi
        deadline = time.monotonic() + (HOLD_S if self.last is not None else self.timeout_s)
        while (left := deadline - time.monotonic()) > 0:
            kind, video, _, _ = ndi.recv_capture_v2(self.receiver, max(1, int(left * 1000)))
            if kind == ndi.FRAME_TYPE_VIDEO:
                try:
                    self.last = fit(to_rgb(ndi, video.FourCC, video.data), self.width, self.height)
                finally:
                    ndi.recv_free_video_v2(self.receiver, video)
                return self.last
            if kind == ndi.FRAME_TYPE_ERROR:
                raise SourceError(f"the NDI source {self.name!r} was lost")
        if self.last is None:
            raise SourceError(f"the NDI source {self.name!r} sent no video in {self.timeout_s:g} s")
        self.held += 1
        if self.held == 1:
            logger.info("NDI source %r paused: its last frame is sent again every %g s", self.name, HOLD_S)
        return self.last

    def close(self) -> None:
        if self.receiver is not None:
            self.ndi.recv_destroy(self.receiver)
            self.receiver = None


# ---------------------------------------------------------------------------------------- sink
class NdiSink:
    """Publishes each output as a frame of the NDI source ``name`` (RGBX, the output's seq in the
    frame's metadata as ``<ditstream seq="N"/>``); receivers see it as ``"MACHINE (name)"``."""

    def __init__(self, name: str, fps: float) -> None:
        self.ndi = ndi = ndi_lib()
        options = ndi.SendCreate()
        options.ndi_name = name
        options.clock_video = False  # outputs come at the stream's pace; NDI must not block the loop
        self.sender = ndi.send_create(options)
        if self.sender is None:
            raise SourceError(f"cannot create the NDI source {name!r} (NDIlib.send_create failed)")
        self.frame = ndi.VideoFrameV2()
        self.frame.FourCC = ndi.FOURCC_VIDEO_TYPE_RGBX
        self.frame.frame_rate_N, self.frame.frame_rate_D = max(1, round(fps * 1000)), 1000

    def __call__(self, header: dict[str, Any], jpeg: bytes) -> None:
        self.frame.data = rgbx(decode_jpeg(jpeg))
        self.frame.metadata = f'<ditstream seq="{int(header["seq"])}"/>'
        self.ndi.send_send_video_v2(self.sender, self.frame)

    def close(self) -> None:
        if self.sender is not None:
            self.ndi.send_destroy(self.sender)
            self.sender = None
