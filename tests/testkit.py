"""Test helpers for the wire protocol: encode inputs, build hostile images, read outputs and messages.

Test-only (not shipped in the wheel); the process harnesses (a server in a thread, a server or a
worker in a subprocess, redis-server) are in ``ditstream.bench.harness`` and
``ditstream.bench.scale_harness``, because the benchmarks start them too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


def jpeg(image: Any, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) → JPEG bytes."""
    import numpy as np
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB")


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A small but valid PNG (1-bit greyscale, all black) whose header says ``width``×``height``.

    The zlib-compressed rows of zeros stay tiny (~110 KB for 30000×30000) while decoding would need
    ``width``×``height`` pixels (2.7 GB as RGB): a decompression bomb.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    rows_per_chunk = 1000
    idat = [z.compress(row * rows_per_chunk) for _ in range(height // rows_per_chunk)]
    idat += [z.compress(row * (height % rows_per_chunk)), z.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat))
            + chunk(b"IEND", b""))


def jpeg_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A real 16×16 JPEG whose frame header (SOF0) is patched to say ``width``×``height``."""
    import struct

    import numpy as np

    data = jpeg(np.zeros((16, 16, 3), np.uint8))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), then height and width
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def frame_message(image_bytes: bytes, seq: int, ts: float | None = None) -> bytes:
    """A header-framed input frame."""
    from ditstream.server.live.protocol import pack_frame

    return pack_frame({"seq": seq, "ts": time.perf_counter() * 1e3 if ts is None else ts}, image_bytes)


def decode_output(message: bytes) -> tuple[dict[str, Any], Any]:
    """An output frame → (header, uint8 image)."""
    import simplejpeg
    from ditstream.server.live.protocol import unpack_frame

    header, body = unpack_frame(message)
    assert header is not None, "outputs always carry a header"
    return header, simplejpeg.decode_jpeg(bytes(body), colorspace="RGB")


async def recv_json(ws: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The next text message (binary frames before it are skipped)."""
    import json

    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, str):
            return json.loads(msg)


async def recv_frame(ws: Any, timeout: float = 60.0, texts: list[dict[str, Any]] | None = None
                     ) -> tuple[dict[str, Any], Any]:
    """The next output frame; text messages before it are appended to ``texts``."""
    import json

    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, bytes):
            return decode_output(msg)
        if texts is not None:
            texts.append(json.loads(msg))


# -------------------------------------------------------------------------------- processes
def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> Any:
    """``python -m ditstream ARGS`` as a user runs it: a ``CompletedProcess`` with text output."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ditstream", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    from ditstream.bench.scale_harness import free_port as harness_free_port

    return harness_free_port()


def wait_ready(proc: Any, base_url: str, *, log: Any = None, timeout: float = 180.0) -> None:
    """Poll ``base_url/ready`` until it answers 200; fail at once, with the server's output, if the
    process exits first (polling: the server is another process, there is no event to wait on)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            from pathlib import Path

            out = Path(log).read_text() if log else (proc.stdout.read().decode() if proc.stdout else "")
            raise AssertionError(f"the server exited with {proc.returncode}:\n{out[-4000:]}")
        try:
            if httpx.get(base_url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{base_url} did not become ready in {timeout:.0f} s"
        time.sleep(0.3)


def run_streams(core: Any, configs: list[Any], frames: list[Any], fit: Any = None) -> list[list[Any]]:
    """Each config as one stream of ``core`` (an ``EngineCore``); frame ``i`` goes to every stream on
    tick ``i`` (through ``fit(frame, config)``; by default as it is for img2img, none for txt2img).
    Returns each stream's outputs in emission order: what the parity and isolation tests compare."""
    from ditstream.engine.types import Frame

    fit = fit or (lambda f, cfg: f if cfg.mode == "img2img" else None)
    states = [core.add(c) for c in configs]
    got: dict[str, list[Any]] = {s.id: [] for s in states}
    for i, f in enumerate(frames):
        for s in states:
            core.submit(s.id, Frame(image=fit(f, s.config), seq=i))
        for o in core.step():
            got[o.stream_id].append(o)
    for o in core.flush():
        got[o.stream_id].append(o)
    return [got[s.id] for s in states]
