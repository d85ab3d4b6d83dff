"""Real processes for scale-out tests and benches: a loopback ``redis-server``, worker and gateway processes.

Workers and gateways run as separate processes (``python -m ditstream worker|serve``) so that killing one is a real
``SIGKILL``: no ``finally`` runs, the heartbeat just stops, jobs stay pending in Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any


def _die_with_parent() -> None:
    """Child side of Popen (Linux): SIGKILL us when the parent dies, so no worker outlives a killed run."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _preexec() -> Any:
    return _die_with_parent if sys.platform.startswith("linux") else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loopback:
    """The addresses of a server listening on 127.0.0.1:``port``."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)


class RedisServer:
    """``redis-server`` on 127.0.0.1:<free port>, no persistence; ``restart()`` keeps the port."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        log = open(self.log_dir / f"redis-{self.port}.log", "ab") if self.log_dir else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_preexec())
        deadline = time.monotonic() + timeout
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        while True:
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ChildProcess:
    """``python -m ditstream ARGS`` as a child process logging to ``log``; ``kill()`` is a real SIGKILL."""

    def __init__(self, cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "ditstream", *cmd]
        self.log = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Any:
        out: Any = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=_preexec())
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash or an OOM kill."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_tail(self, n: int = 4000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-n:]


class WorkerProcess(ChildProcess):
    """``python -m ditstream worker --redis URL ...`` as a child process (logs to ``log``)."""

    def __init__(self, redis_url: str, *args: str, worker_id: str, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(["worker", "--redis", redis_url, "--worker-id", worker_id, *args], log, env)
        self.worker_id = worker_id

    def start(self) -> WorkerProcess:
        return super().start()


class GatewayProcess(ChildProcess, Loopback):
    """``python -m ditstream serve --redis URL`` on 127.0.0.1:``port`` (a free one unless given).

    A real process, so that killing it is a real ``SIGKILL``: its sockets close, its liveness key
    in Redis just stops being refreshed. ``wait_ready()`` polls ``/ready`` until 200.
    """

    def __init__(self, redis_url: str, *args: str, port: int | None = None, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        super().__init__(["serve", "--redis", redis_url, "--host", "127.0.0.1", "--port", str(self.port),
                          "--log-level", "warning", *args], log, env)

    def start(self) -> GatewayProcess:
        return super().start()

    def wait_ready(self, timeout: float = 60.0) -> GatewayProcess:
        """Until ``/ready`` is 200 (Redis answers, a worker beats); raises with the log if it exits first."""
        import httpx

        def ready() -> bool:
            if not self.running:
                raise RuntimeError(f"gateway exited ({self.proc and self.proc.returncode}): {self.log_tail(2000)}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/ready", timeout=1).status_code == 200
            return False

        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready after {timeout:.0f} s: {self.log_tail(2000)}")
            time.sleep(0.05)
        return self


def wait_for(predicate: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
