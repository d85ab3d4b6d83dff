"""A WHIP publisher we did not write: FFmpeg's WHIP muxer (as bundled in PyAV's wheels), as a child process.

Run as ``python tests/whip_ffmpeg.py URL [--cert C --key K] [--token T] [--frames N]``. It opens the
muxer (``POST``, ICE, DTLS: FFmpeg does all of it at the first frame), prints ``connected`` (or
``error: <FFmpeg's message>`` and exits 1), waits for a line on stdin, then sends N more frames of
H.264 baseline 320x240 at 30 fps, frame i a flat grey of level ``level(i)``, prints ``sent N`` and
closes (FFmpeg's ``DELETE``). A separate process because PyAV's muxer holds the GIL while FFmpeg
blocks on the network: in the test's process it would stall the server it publishes to.
"""

from __future__ import annotations

import argparse
import sys
import time

import av
import av.logging
import numpy as np

FPS = 30
WIDTH, HEIGHT = 320, 240


def level(i: int) -> int:
    """Frame i's grey level: a ramp the receiver can read back (40 .. 40 + N)."""
    return 40 + i


def frame(i: int) -> av.VideoFrame:
    f = av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), level(i), np.uint8), format="rgb24")
    f.pts = i
    return f


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--token")
    ap.add_argument("--frames", type=int, default=150)
    args = ap.parse_args()
    av.logging.set_level(av.logging.ERROR)  # FFmpeg's own errors, on stderr
    options = {"handshake_timeout": "10000"}
    if args.cert:
        options.update(cert_file=args.cert, key_file=args.key)
    if args.token:
        options["authorization"] = args.token
    try:
        out = av.open(args.url, mode="w", format="whip", options=options)
        stream = out.add_stream("libx264", rate=FPS, options={"profile": "baseline", "tune": "zerolatency",
                                                              "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for packet in stream.encode(frame(0)):
            out.mux(packet)  # the first mux opens the session: POST, ICE, DTLS
    except av.error.FFmpegError as exc:
        print(f"error: {exc!r}", flush=True)  # FFmpeg's reason is on stderr ("DTLS session failed")
        return 1
    print("connected", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    for i in range(1, args.frames + 1):
        time.sleep(max(0.0, start + i / FPS - time.monotonic()))
        for packet in stream.encode(frame(i)):
            out.mux(packet)
    print(f"sent {args.frames}", flush=True)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
