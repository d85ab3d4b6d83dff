"""Run a real uvicorn server on loopback in a background thread (tests, examples).

The socket is bound before uvicorn starts (port 0 → a free port, no race), and the context manager
waits for startup — lifespan included, so the engine is running — and for a clean shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import uvicorn


class ServerThread:
    """``with ServerThread(app) as srv: srv.url, srv.ws_url`` — uvicorn on 127.0.0.1:<free port>."""

    def __init__(self, app: Any, *, ws_max_size: int = 16 * 1024 * 1024, startup_timeout: float = 120.0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.config = uvicorn.Config(app, log_level="warning", ws_max_size=ws_max_size, lifespan="on",
                                     ws_per_message_deflate=False,
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, name="uvicorn-test", daemon=True)
        self.startup_timeout = startup_timeout
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by __enter__
            self.error = exc

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {self.error!r}")
            time.sleep(0.02)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


# ------------------------------------------------------------------------------ protocol helpers
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
    from ditstream.server.protocol import pack_frame

    return pack_frame({"seq": seq, "ts": time.perf_counter() * 1e3 if ts is None else ts}, image_bytes)


def decode_output(message: bytes) -> tuple[dict[str, Any], Any]:
    """An output frame → (header, uint8 image)."""
    import simplejpeg
    from ditstream.server.protocol import unpack_frame

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


@contextlib.contextmanager
def serve_subprocess(args: list[str], env: dict[str, str] | None = None,
                     timeout: float = 120.0) -> Iterator[tuple[int, int]]:
    """``ditstream serve <args>`` in a subprocess on a free loopback port; yields (port, pid).

    Waits for ``/ready``; a server that exits first raises with the tail of its stderr. The
    process is terminated (then killed) on exit, so a bench or test never leaves one behind.
    """
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "ditstream", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise RuntimeError(f"server exited ({proc.returncode}): {err}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
