"""Per-stream queues: a one-slot input mailbox (latest wins) and a bounded drop-oldest output.

Both are thread-safe and never block the producer, so a producer faster than the engine can never
grow memory: at most one pending input and ``maxsize`` outputs exist per stream.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds at most one item; ``put`` replaces (and counts) an item not yet taken."""

    def __init__(self) -> None:
        self._item: T | None = None
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Store ``item``; returns True if it replaced an unprocessed one (counted as dropped)."""
        with self._lock:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self._item = item
            return replaced

    def take(self) -> T | None:
        with self._lock:
            item, self._item = self._item, None
            return item

    def __bool__(self) -> bool:
        return self._item is not None


class OutputQueue(Generic[T]):
    """Bounded FIFO; when full the oldest item is dropped (and counted) so the newest always fits.

    ``notify`` is called (from the producer's thread) after every put, e.g. to wake an asyncio
    sender with ``loop.call_soon_threadsafe``; it must not block.
    """

    def __init__(self, maxsize: int, notify: Callable[[], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.notify = notify
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self.dropped = 0
        self.closed = False

    def put(self, item: T) -> None:
        with self._cond:
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
        if self.notify is not None:
            self.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, waiting up to ``timeout`` seconds; ``None`` on timeout or when closed."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait_for(lambda: self._items or self.closed, timeout=timeout)
            return self._items.popleft() if self._items else None

    def get_nowait(self) -> T | None:
        with self._cond:
            return self._items.popleft() if self._items else None

    def drain(self) -> list[T]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        if self.notify is not None:
            self.notify()

    def __len__(self) -> int:
        return len(self._items)
