"""Limits and small helpers shared by the two halves of a live stream's session (``ws.py``,
``session_out.py``)."""

from __future__ import annotations

import asyncio

#: Control replies waiting for the sender; a client that never reads them is cut off.
MAX_PENDING_CONTROL = 256
#: Receive times kept for frames in flight (more than the engine can ever hold per stream).
MAX_TRACKED_FRAMES = 64


def close_if_added(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)
