"""Admission control: non-blocking permits, taken at entry and held for the life of the work.

Refusing fast beats queueing without bound (TGI's semaphore, WebSocket 1013): a stream over
``max_streams`` or a REST request over ``max_queued_jobs`` is refused at once with
``OverloadedError`` (REST 429 + Retry-After, WS close 1013) and counted by reason.
"""

from __future__ import annotations

import logging
import threading

from ditstream.engine.errors import OverloadedError
from ditstream.server.metrics import Metrics

logger = logging.getLogger(__name__)


class Permit:
    """Held while a stream or a job exists; ``release`` is idempotent (safe in ``finally``)."""

    def __init__(self, pool: PermitPool, count: int) -> None:
        self._pool = pool
        self.count = count
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._give_back(self.count)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PermitPool:
    """A counting semaphore that never waits."""

    def __init__(self, name: str, limit: int, metrics: Metrics, retry_after: float) -> None:
        self.name = name
        self.limit = limit
        self.in_use = 0
        self._metrics = metrics
        self._retry_after = retry_after
        self._lock = threading.Lock()

    def acquire(self, count: int = 1) -> Permit:
        """Take ``count`` permits or raise ``OverloadedError`` (counted as rejected)."""
        with self._lock:
            if self.in_use + count <= self.limit:
                self.in_use += count
                return Permit(self, count)
        self._metrics.rejected.labels(self.name).inc()
        logger.info("refused %s: %d/%d in use, %d asked", self.name, self.in_use, self.limit, count)
        raise OverloadedError(
            f"server is at capacity: {self.in_use} of {self.limit} {self.name.replace('_', ' ')} in use",
            retry_after=self._retry_after, reason=self.name)

    def _give_back(self, count: int) -> None:
        with self._lock:
            self.in_use -= count


class Admission:
    """The two pools: live streams and queued REST images."""

    def __init__(self, max_streams: int, max_jobs: int, metrics: Metrics, retry_after: float = 1.0) -> None:
        self.streams = PermitPool("streams", max_streams, metrics, retry_after)
        self.jobs = PermitPool("queued_jobs", max_jobs, metrics, retry_after)
