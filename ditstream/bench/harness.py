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
import tempfile
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import uvicorn

from ditstream.bench.scale_harness import Loopback


class ServerThread(Loopback):
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
    # stderr goes to a file, not a pipe: nobody reads a pipe while the server runs, and a server that
    # logs more than a pipe holds (64 KiB) would block on its next log line.
    err_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=err_file)

    def tail() -> str:
        err_file.seek(0)
        return err_file.read().decode(errors="replace")[-2000:]

    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready within {timeout:.0f} s: {tail()}")
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        err_file.close()
