"""ASGI middleware of the app: request metrics by route and status, and the request body limit
(answered with the error table's 413 before a byte reaches a route)."""

from __future__ import annotations

import json

from ditstream.engine.errors import DitstreamError, PayloadTooLargeError
from ditstream.server.errors import mapping_for, rest_error_body, rest_headers
from ditstream.server.metrics import Metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KNOWN_ROUTES = frozenset({"/", "/health", "/ready", "/metrics", "/v1/models", "/v1/images/generations",
                          "/v1/images/edits", "/v1/stream"})


#: ``code`` of FastAPI's own HTTP refusals in the error body.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


# ------------------------------------------------------------------------------------ middleware
class MetricsMiddleware:
    """Counts every HTTP response and WebSocket close by route template and status/close code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        code: list[str] = []

        async def send_wrapper(message: Message) -> None:
            t = message["type"]
            if t in ("http.response.start", "websocket.http.response.start"):
                code.append(str(message["status"]))
            elif t == "websocket.close" and not code:
                code.append(str(message.get("code", 1000)))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or scope["path"]
            if label not in KNOWN_ROUTES:
                label = "/web/*" if scope["path"].startswith("/web/") else "other"
            self.metrics.requests.labels(label, code[0] if code else ("1000" if scope["type"] == "websocket"
                                                                      else "500")).inc()


class BodyLimitMiddleware:
    """Refuses HTTP bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await _send_error(send, PayloadTooLargeError(
                    f"request body is {int(v)} bytes; the limit is {self.limit}", field="body"))
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLargeError(f"request body is over the limit of {self.limit} bytes",
                                               field="body")
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send: Send, err: DitstreamError) -> None:
    body = json.dumps(rest_error_body(err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in rest_headers(err).items()]
    await send({"type": "http.response.start", "status": mapping_for(err).http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
