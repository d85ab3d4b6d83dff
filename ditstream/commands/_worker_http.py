"""A worker's ``/health`` and ``/metrics`` (``ditstream worker --health-port``): what the container
healthcheck (docker/healthcheck.sh) and Prometheus read from a process that has no HTTP server of its own.

A tiny Starlette app served by uvicorn on a background thread (the libraries the API server already
uses) instead of a hand-written ``http.server`` handler; the exposition format is prometheus_client's.
The socket is bound before this returns, so a probe sent right after is queued, never refused, and a
port in use fails here, at start-up.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ditstream.server.scale.worker import Worker


class HealthServer:
    """uvicorn serving one worker's health app on its own daemon thread; ``shutdown()`` stops it."""

    def __init__(self, w: Worker, port: int, host: str = "0.0.0.0") -> None:
        import uvicorn

        self._sock = socket.create_server((host, port), family=socket.AF_INET, backlog=64)
        config = uvicorn.Config(health_app(w), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="ditstream-worker-health", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop serving (uvicorn's graceful exit) and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()


def health_app(w: Worker):  # -> starlette.applications.Starlette
    """``/health``: 200 once the engine is warm and runs, 503 ``warming`` before, else 503 ``down`` (the
    worker's own ``health()``); ``/metrics``: the worker's counters, labelled with its id."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_CounterCollector(w))

    async def health(_request: Request) -> JSONResponse:
        ok, body = w.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/health", health), Route("/metrics", metrics)])


class _CounterCollector:
    """prometheus_client collector reading the worker's counters at scrape time (one owner: the worker)."""

    def __init__(self, w: Worker) -> None:
        self._w = w

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import UnknownMetricFamily

        for name, value in sorted(self._w.counters.items()):  # a snapshot: Counters.items() copies under its lock
            family = UnknownMetricFamily(f"ditstream_worker_{name}", f"worker counter {name}", labels=["worker"])
            family.add_metric([self._w.id], float(value))
            yield family
