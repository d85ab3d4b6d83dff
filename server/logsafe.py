"""Keep API keys and image bytes out of the logs, including the ones uvicorn writes for us.

Our own code logs paths and error messages only, never headers, query strings or payloads. uvicorn
does not: its WebSocket handshake line (``"WebSocket /v1/stream?token=..." [accepted]``) and its
access log carry the full query string, so a browser that authenticates with ``?token=<key>`` would
leave the key in every log; at ``--log-level debug`` the websockets library it drives also dumps
handshake headers (``Authorization: Bearer <key>``, ``Sec-WebSocket-Protocol: ditstream.bearer.<key>``)
and the first bytes of every binary frame. ``install()`` puts a filter on those loggers that rewrites
such records before any handler sees them.
"""

from __future__ import annotations

import logging
import re

#: Loggers uvicorn and websockets write to (filters on a logger apply to records created on it).
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets", "websockets.server",
           "websockets.protocol")
REDACTED = "***"

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # ?token=<key> / &api_key=<key> in a path or URL
    (re.compile(r"(?i)([?&](?:token|api[_-]?key|key|access_token)=)[^&\s\"'#]+"), r"\1" + REDACTED),
    # Authorization: Bearer <key> (headers dumped at debug level, error messages)
    (re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"), r"\1" + REDACTED),
    # the browser subprotocol that carries a key
    (re.compile(r"(ditstream\.bearer\.)[^\s\"',;]+"), r"\1" + REDACTED),
    # websockets' frame dumps: "< BINARY ff d8 ff e0 ... [1234 bytes]"
    (re.compile(r"(BINARY)\s+(?:[0-9a-f]{2}\s?)+(?:\.\.\.\s*)?(?:[0-9a-f]{2}\s?)*"), r"\1 " + REDACTED + " "),
)


def redact(text: str) -> str:
    """``text`` with keys and frame bytes replaced by ``***``."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record whose message would reveal a key or frame bytes (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logger's problem, not ours
            return True
        clean = redact(message)
        if clean == message:
            return True
        # Redact argument by argument first: uvicorn's access formatter unpacks ``record.args`` itself.
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        try:
            still = record.getMessage() != clean
        except Exception:
            still = True
        if still:  # the secret sat in a non-string argument: keep only the clean text
            record.msg, record.args = clean, ()
        return True


def install(names: tuple[str, ...] = LOGGERS) -> None:
    """Add the filter to ``names`` once (idempotent: every app created in a process calls it)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
