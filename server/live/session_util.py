"""Limits and small helpers shared by the live sessions: both halves of a WebSocket stream's session
(``ws.py``, ``session_out.py``) and a WebRTC session (``webrtc_session.py``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import ValidationError

if TYPE_CHECKING:
    from ditstream.server.api.state import AppState
    from ditstream.server.live.protocol import ConfigMessage

#: Control replies waiting for the sender; a client that never reads them is cut off.
MAX_PENDING_CONTROL = 256
#: Receive times kept for frames in flight (more than the engine can ever hold per stream).
MAX_TRACKED_FRAMES = 64


def close_if_added(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def wanted_config(state: AppState, current: StreamConfig, msg: ConfigMessage) -> StreamConfig:
    """The config a ``config`` message asks for, checked (the error names the field); nothing applied.

    The one validation of a live config change, whichever way it came (WebSocket message, WebRTC
    data channel, ``POST /v1/sessions/{id}/config``).
    """
    if msg.fps is not None and msg.fps > state.settings.max_fps:
        raise ValidationError(f"fps is {msg.fps}; the limit is {state.settings.max_fps}", field="fps")
    try:
        wanted = current.replace(**msg.engine_changes())
    except TypeError as exc:
        raise ValidationError(f"bad config: {exc}", field="config") from exc
    return state.validate(wanted)  # names the field on error
