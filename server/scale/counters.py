"""Event counters shared by the threads of a gateway or a worker, each bumped under one lock.

A gateway's publisher, reader, supervisor and the event loop all count events (jobs sent, frames
received, sessions re-pinned); a plain ``dict`` bumped with ``+=`` from several threads loses counts.
One ``Counters`` per gateway or worker owns them all; readers (``/metrics``, heartbeats, tests) get
a snapshot. The names are fixed at construction, so a misspelt counter fails loudly.
"""

from __future__ import annotations

import threading
from collections.abc import ItemsView, Iterable


class Counters:
    """Fixed-name numeric counters, safe to bump from any thread."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(names, 0)

    def add(self, name: str, n: float = 1) -> None:
        """Add ``n`` to ``name`` (a ``KeyError`` for a name not declared)."""
        with self._lock:
            self._values[name] += n

    def __getitem__(self, name: str) -> float:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def items(self) -> ItemsView[str, float]:
        return self.snapshot().items()
