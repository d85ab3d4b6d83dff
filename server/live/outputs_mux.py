"""PyAV for one output: an H.264 encoder and a container (FLV over RTMP, MPEG-TS over SRT, MP4 on
disk), fed RGB frames with wall-clock timestamps. Blocking, on the output's own thread (``outputs.py``).

Timestamps are milliseconds since the output's first frame, taken when each frame left the server,
so the output keeps the stream's own rate (variable, as a live stream's is). A keyframe every
``KEYFRAME_S`` (what streaming platforms ask for), forced by time since rates vary. The size is the
first frame's (rounded down to even, as 4:2:0 needs); a later frame of another size (the client
resized the stream) is scaled to it, so the output goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from fractions import Fraction
from typing import Any

import numpy as np
from ditstream.engine.errors import ValidationError
from ditstream.server.live.outputs_policy import OutputTarget

#: Seconds between forced keyframes (Twitch and YouTube ask for 2).
KEYFRAME_S = 2.0
#: The frame rate the encoder's rate control assumes; timestamps carry the real one.
NOMINAL_FPS = 30
TIME_BASE = Fraction(1, 1000)
#: Per-encoder options: low latency (no lookahead, no B-frames: a frame in is a packet out).
ENCODER_OPTIONS = {"libx264": {"preset": "veryfast", "tune": "zerolatency"}}
#: MP4 recordings are fragmented: a recording cut short (a crash, a full disk) still plays to its end.
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}


def check_encoder(name: str) -> None:
    """The ``--output-encoder`` exists in PyAV's FFmpeg and encodes video; raises ``ValidationError``."""
    import av

    try:
        codec = av.codec.Codec(name, "w")
    except Exception as exc:  # av raises UnknownCodecError, ValueError, ... by version
        raise ValidationError(f"--output-encoder {name!r} is not an encoder of PyAV's FFmpeg: {exc}",
                              field="output_encoder") from exc
    if codec.type != "video":
        raise ValidationError(f"--output-encoder {name!r} is a {codec.type} encoder, not a video one",
                              field="output_encoder")


def missing_protocols(schemes: list[str]) -> list[str]:
    """The ``schemes`` PyAV's FFmpeg cannot write to (PyAV's wheels have no ``srt``: no libsrt).

    Asked of libavformat (``avio_enum_protocols``) — PyAV does not expose it; when the library cannot
    be found (an unusual install) nothing is reported missing and a missing protocol shows as the
    output's ``failed`` reason instead.
    """
    have = output_protocols()
    return [] if have is None else sorted({s for s in schemes if s not in have})


def output_protocols() -> set[str] | None:
    """Protocols libavformat can write, or None when the library cannot be asked."""
    import av

    base = os.path.dirname(av.__file__)
    found = sorted(glob.glob(base + ".libs/libavformat*")) + sorted(glob.glob(os.path.join(base, ".dylibs",
                                                                                            "libavformat*")))
    path = found[0] if found else ctypes.util.find_library("avformat")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        enum = lib.avio_enum_protocols
    except (OSError, AttributeError):
        return None
    enum.restype = ctypes.c_char_p
    enum.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    opaque, names = ctypes.c_void_p(None), set()
    while (name := enum(ctypes.byref(opaque), 1)) is not None:
        names.add(name.decode())
    return names


class Muxer:
    """One output's encoder and container; ``write`` and ``close`` block on the network or disk."""

    def __init__(self, target: OutputTarget, encoder: str, bitrate: int, width: int, height: int) -> None:
        import av

        self.width, self.height = width - width % 2, height - height % 2
        options = MP4_OPTIONS if target.format == "mp4" else {}
        self.container: Any = av.open(target.url, mode="w", format=target.format, container_options=options)
        codec_options = {**ENCODER_OPTIONS.get(encoder, {}), "maxrate": str(bitrate), "bufsize": str(2 * bitrate)}
        self.stream: Any = self.container.add_stream(encoder, rate=NOMINAL_FPS, options=codec_options)
        ctx = self.stream.codec_context
        ctx.width, ctx.height, ctx.pix_fmt = self.width, self.height, "yuv420p"
        ctx.bit_rate = bitrate
        ctx.time_base = TIME_BASE
        self.stream.time_base = TIME_BASE
        self._last_pts = -1
        self._last_key = -KEYFRAME_S * 1e3

    def write(self, image: np.ndarray, t_ms: float) -> int:
        """Encode one RGB frame (uint8 (H, W, 3)) at ``t_ms`` since the output began; bytes written."""
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        pts = max(int(t_ms), self._last_pts + 1)
        frame.pts, frame.time_base = pts, TIME_BASE
        if pts - self._last_key >= KEYFRAME_S * 1e3:
            frame.pict_type = av.video.frame.PictureType.I
            self._last_key = pts
        self._last_pts = pts
        return self._mux(self.stream.encode(frame))

    def close(self) -> int:
        """Flush the encoder and end the container (an MP4 gets its index); bytes written."""
        try:
            return self._mux(self.stream.encode(None))
        finally:
            self.container.close()

    def abandon(self) -> None:
        """Close without flushing (the connection failed: flushing would fail again)."""
        try:
            self.container.close()
        except Exception:  # the output failed already; its reason is set
            pass

    def _mux(self, packets: list[Any]) -> int:
        size = 0
        for packet in packets:
            size += packet.size
            self.container.mux(packet)
        return size
