"""One output's encoder and muxer in a process of its own: ``python -m ditstream.server.live.outputs_child``.

Why a process and not only a thread: PyAV holds the GIL while FFmpeg opens an output (``avio_open``
and the header: for RTMP the TCP connect and the whole handshake), so a slow or silent receiver would
freeze every thread of the server, its event loop included; encoding costs CPU under the GIL too.
In a child, FFmpeg blocks only itself, and a stuck one can always be killed (``outputs.py``).

The parent writes one JSON line (``target``: the ``OutputTarget`` fields; ``encoder``, ``bitrate``) —
on stdin, never argv, where ``ps`` would show a stream key — then frames, each ``FRAME`` (time in ms
since the output began, width, height) and ``width × height × 3`` bytes of RGB. End of input: flush,
close (an MP4 gets its index), exit. On stdout, one JSON line per event: ``{"event": "wrote", "bytes": N,
"frames": 1}`` per frame written, then ``{"event": "ended"}`` or ``{"event": "failed", "reason": ...}``
(secrets masked).
"""

from __future__ import annotations

import json
import struct
import sys
from typing import IO, Any

import numpy as np
from ditstream.server.live.outputs_mux import Muxer
from ditstream.server.live.outputs_policy import OutputTarget

#: A frame's header: milliseconds since the output began (float64), width, height (uint32).
FRAME = struct.Struct("<dII")


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    """``n`` bytes, or None at a clean end of input (before the first byte)."""
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            if left == n:
                return None
            raise EOFError(f"input ended inside a frame ({n - left} of {n} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _event(out: IO[bytes], event: str, **fields: Any) -> None:
    out.write(json.dumps({"event": event, **fields}).encode() + b"\n")
    out.flush()


def run(inp: IO[bytes], out: IO[bytes]) -> int:
    """Encode and mux what ``inp`` brings until it ends; report on ``out``. Exit status 0 or 1."""
    cfg = json.loads(inp.readline())
    target = OutputTarget(**cfg["target"])
    muxer: Muxer | None = None
    try:
        while (head := _read_exact(inp, FRAME.size)) is not None:
            t_ms, width, height = FRAME.unpack(head)
            data = _read_exact(inp, width * height * 3)
            if data is None:
                raise EOFError("input ended after a frame's header")
            image = np.frombuffer(data, np.uint8).reshape(height, width, 3)
            if muxer is None:
                muxer = Muxer(target, cfg["encoder"], int(cfg["bitrate"]), width, height)
            _event(out, "wrote", bytes=muxer.write(image, t_ms), frames=1)
        if muxer is not None:
            _event(out, "wrote", bytes=muxer.close(), frames=0)
            muxer = None
        _event(out, "ended")
        return 0
    except Exception as exc:  # the network, the disk, the encoder: this output fails, reported
        if muxer is not None:
            muxer.abandon()
        _event(out, "failed", reason=target.mask(f"{type(exc).__name__}: {exc}"))
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.stdin.buffer, sys.stdout.buffer))
