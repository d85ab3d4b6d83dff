"""API-key auth as plain ASGI middleware, so HTTP and WebSocket are checked by the same code.

Keys are kept only as sha256 digests and compared with ``hmac.compare_digest`` against every
configured digest (no early exit, no ``==``). Where the key may come from:

* ``Authorization: Bearer <key>`` — REST and non-browser WebSocket clients;
* WebSocket only, for browsers (which cannot set headers on a WebSocket): the subprotocol
  ``ditstream.bearer.<key>`` offered next to ``ditstream``, or the query parameter ``?token=<key>``.

Refusals: HTTP 401 with an OpenAI-shaped error body; WebSocket: the handshake is accepted, the
in-band error ``{"type":"error","code":"unauthorized"}`` is sent and the socket is closed with 1008
(a refused handshake would only show the browser a generic failure, never a close code).
Open paths: ``/health``, ``/ready``, ``/metrics`` and the static browser page (it holds no secrets).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from urllib.parse import parse_qs

from ditstream.engine.errors import AuthError
from ditstream.server.errors import WS_POLICY_VIOLATION, rest_error_body, rest_headers
from ditstream.server.metrics import Metrics
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

SUBPROTOCOL = "ditstream"
TOKEN_SUBPROTOCOL_PREFIX = "ditstream.bearer."
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/web/",)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def presented_token(scope: Scope) -> str | None:
    """The key a request or handshake carries, wherever it is allowed to be."""
    auth = _header(scope, b"authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if scope["type"] == "websocket":
        for proto in scope.get("subprotocols", ()):
            if proto.startswith(TOKEN_SUBPROTOCOL_PREFIX):
                return proto[len(TOKEN_SUBPROTOCOL_PREFIX):]
        tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        if tokens:
            return tokens[0]
    return None


class APIKeyMiddleware:
    """Rejects requests without a valid key when keys are configured."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], metrics: Metrics) -> None:
        self.app = app
        self._digests = [digest(k) for k in keys]
        self._metrics = metrics

    def is_valid(self, token: str | None) -> bool:
        if token is None:
            return False
        presented = digest(token)
        ok = False
        for d in self._digests:  # compare against all: timing does not reveal which key matched
            ok |= hmac.compare_digest(presented, d)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._digests or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = presented_token(scope)
        if self.is_valid(token):
            await self.app(scope, receive, send)
            return
        err = AuthError("missing API key" if token is None else "invalid API key", field="authorization")
        self._metrics.rejected.labels("unauthorized").inc()
        logger.info("refused %s %s: %s", scope["type"], scope["path"], err.message)
        if scope["type"] == "http":
            await self._reject_http(send, err)
        else:
            await self._reject_ws(scope, receive, send, err)

    @staticmethod
    def is_open(path: str) -> bool:
        """Paths served without a key (no secrets behind them)."""
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    @staticmethod
    async def _reject_http(send: Send, err: AuthError) -> None:
        body = json.dumps(rest_error_body(err)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in rest_headers(err).items()]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _reject_ws(scope: Scope, receive: Receive, send: Send, err: AuthError) -> None:
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        accept: dict = {"type": "websocket.accept"}
        if SUBPROTOCOL in scope.get("subprotocols", ()):
            accept["subprotocol"] = SUBPROTOCOL
        await send(accept)
        await send({"type": "websocket.send", "text": json.dumps(err.to_dict())})
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": err.error_type})
