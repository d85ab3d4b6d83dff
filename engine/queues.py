"""Per-stream queues: a two-deep input inbox, a one-slot mailbox (latest wins) and a bounded
drop-oldest output.

All are thread-safe and never block the producer, so a producer faster than the engine can never
grow memory: at most ``depth`` pending inputs and ``maxsize`` outputs exist per stream.
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


class FrameInbox(Generic[T]):
    """A stream's pending input frames: at most ``depth``, taken oldest first, one per ``take`` (tick).

    Latest wins only for a frame that has already sat through a tick: ``put`` first drops every
    pending frame that was there at an earlier ``take`` (a tick took an older frame of this stream
    and left it), then the oldest while the inbox is full. So a client with two frames in flight
    keeps both (the older is taken first, the newer by the next tick), while a producer faster than
    the engine is served at most about one tick behind its newest frame and never grows memory.
    ``depth=1`` is a plain latest-wins slot.
    """

    def __init__(self, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth = depth
        self._items: deque[tuple[T, int]] = deque()  # (item, takes counted when it was put)
        self._takes = 0
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, item: T) -> int:
        """Queue ``item``; returns how many pending items it made drop (0 when none)."""
        with self._lock:
            before = len(self._items)
            while self._items and self._items[0][1] < self._takes:  # sat through a tick already
                self._items.popleft()
            while len(self._items) >= self.depth:
                self._items.popleft()
            dropped = before - len(self._items)
            self.dropped += dropped
            self._items.append((item, self._takes))
            return dropped

    def take(self) -> T | None:
        """The oldest pending item (called once per tick, so the others count as having sat through it)."""
        with self._lock:
            self._takes += 1
            return self._items.popleft()[0] if self._items else None

    def oldest(self) -> T | None:
        """The item the next ``take`` returns, left in place."""
        with self._lock:
            return self._items[0][0] if self._items else None

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)


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
        """The oldest item, waiting up to ``timeout`` seconds; ``None`` on timeout or when closed.

        For a consumer thread that blocks (tests, scripts); the server never blocks on a queue: it is
        woken by ``notify`` and takes with ``get_nowait``/``drain``."""
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

    def peek(self) -> list[T]:
        """The queued items, oldest first, left in place."""
        with self._cond:
            return list(self._items)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        if self.notify is not None:
            self.notify()

    def __len__(self) -> int:
        return len(self._items)
