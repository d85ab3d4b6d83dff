"""Why recently ended WebRTC sessions ended, so that ``GET``/``DELETE`` on one can still say it.

A WHIP publisher whose DTLS handshake fails (FFmpeg: a P-224 certificate) ends its session on the
server before the publisher's ``DELETE`` arrives; answering that ``DELETE`` — or a ``GET`` — with a
bare 404 would hide the cause. Each app keeps the last ``LIMIT`` end reasons (bounded: a session id
is never kept forever); the record lives and dies with the app's ``AppState``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

#: How many ended sessions' reasons an app remembers.
LIMIT = 256


class EndedSessions:
    """One app's recently ended WebRTC sessions: id → why it ended (oldest forgotten first)."""

    _by_app: dict[int, EndedSessions] = {}

    def __init__(self) -> None:
        self.reasons: OrderedDict[str, str] = OrderedDict()

    @classmethod
    def of(cls, state: Any) -> EndedSessions:
        """The record of ``state``'s app (made on first use, dropped when the state is collected)."""
        key = id(state)
        found = cls._by_app.get(key)
        if found is None:
            found = cls._by_app[key] = cls()
            weakref.finalize(state, cls._by_app.pop, key, None)
        return found

    def record(self, session: str, reason: str) -> None:
        self.reasons[session] = reason
        self.reasons.move_to_end(session)
        while len(self.reasons) > LIMIT:
            self.reasons.popitem(last=False)

    def reason(self, session: str) -> str | None:
        return self.reasons.get(session)
