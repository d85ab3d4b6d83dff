"""The FastAPI app factory: engine in the lifespan, middleware, routes and error handlers.

``create_app(settings, runner=None)`` builds a self-contained app: its own metrics registry,
admission pools and codec threads. Without ``runner`` the lifespan loads the model named in the
settings (in a worker thread: loading never blocks the event loop); tests pass a null or tiny
runner. The lifespan starts the engine thread and an event-loop lag monitor, and at shutdown turns
``/ready`` to 503, closes live streams (1001) after a grace period and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import DitstreamError, EngineDeadError, PayloadTooLargeError, ValidationError
from ditstream.engine.runner import EngineRunner
from ditstream.server.api.admission import Admission
from ditstream.server.api.auth import APIKeyMiddleware
from ditstream.server.codec import Codec
from ditstream.server.engine_client import EngineClient
from ditstream.server.errors import MalformedMessageError, mapping_for, rest_error_body, rest_headers
from ditstream.server.metrics import Metrics
from ditstream.server.settings import Settings
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"
#: ``defaults`` keys a new stream takes from the model.
STREAM_DEFAULT_KEYS = ("prompt", "width", "height", "steps", "strength", "guidance_scale", "seed")
#: Stream size when neither the model nor the server states one (the null engine).
FALLBACK_SIZE = 512
_STREAM_CONFIG_DEFAULTS = StreamConfig()
KNOWN_ROUTES = frozenset({"/", "/health", "/ready", "/metrics", "/v1/models", "/v1/images/generations",
                          "/v1/images/edits", "/v1/stream"})


@dataclass
class AppState:
    """What routes and sessions share (one per app)."""

    settings: Settings
    metrics: Metrics
    admission: Admission
    codec: Codec
    runner: EngineClient | None = None
    shutting_down: bool = False
    sessions: set[Any] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        """Alive, warm (every shape the backend will run prepared) and not shutting down."""
        return self.runner is not None and self.runner.ready and not self.shutting_down

    @property
    def warming(self) -> list[str]:
        """Shapes the engine still warms before it is ready (empty once warm, or for an engine without any)."""
        if self.runner is None or not self.runner.alive:
            return []
        return list(self.runner.warming)

    def require_engine(self) -> EngineClient:
        if self.runner is None or not self.runner.alive:
            raise EngineDeadError("the engine is not running")
        return self.runner

    def validate(self, cfg: StreamConfig) -> StreamConfig:
        """The engine's validation plus the server's own limits (an injected engine may allow more)."""
        cfg = self.require_engine().validate(cfg)
        s = self.settings
        if len(cfg.prompt) > s.max_prompt_chars:
            raise ValidationError(f"prompt is {len(cfg.prompt)} characters; the limit is {s.max_prompt_chars}",
                                  field="prompt")
        if cfg.width * cfg.height > s.max_pixels:
            raise ValidationError(f"size {cfg.width}x{cfg.height} is {cfg.width * cfg.height} pixels; the limit "
                                  f"is {s.max_pixels}", field="size")
        return cfg

    def model_defaults(self) -> dict[str, Any]:
        """The engine's model defaults (``ditstream.json`` over the loader's fallbacks; ``{}`` for none)."""
        info = self.runner.info if self.runner is not None else {}
        return {k: v for k, v in (info.get("defaults") or {}).items() if k in STREAM_DEFAULT_KEYS}

    def stream_defaults(self) -> dict[str, Any]:
        """Stream settings a new session starts with: the model's defaults, the size overridden by
        the server's ``--width``/``--height`` when given (512² for an engine that states none)."""
        d: dict[str, Any] = {"width": FALLBACK_SIZE, "height": FALLBACK_SIZE, **self.model_defaults()}
        if self.settings.default_width is not None:
            d["width"] = self.settings.default_width
        if self.settings.default_height is not None:
            d["height"] = self.settings.default_height
        return d

    def model_card(self) -> dict[str, Any]:
        """What ``ready`` and ``GET /v1/models`` say about the model: name, where it runs, its native
        size and size multiple, and the settings a new stream starts with (``docs/protocol.md``)."""
        info = self.runner.info if self.runner is not None else {}
        own = self.model_defaults()
        start = self.stream_defaults()
        native = f"{own['width']}x{own['height']}" if "width" in own and "height" in own else None
        return {"model": info.get("model") or self.settings.model, "backend": info.get("backend"),
                "device": info.get("device"), "dtype": info.get("dtype"), "native_size": native,
                "size_multiple": info.get("size_multiple"),
                "defaults": {k: start.get(k, getattr(_STREAM_CONFIG_DEFAULTS, k))
                             for k in ("prompt", "width", "height", "steps", "strength", "guidance_scale")}}


#: ``code`` of FastAPI's own HTTP refusals in the error body.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def state_of(app: Any) -> AppState:
    return app.state.ditstream


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


# ------------------------------------------------------------------------------------ lifespan
async def _lag_monitor(metrics: Metrics, interval: float = 0.025) -> None:
    """Measures how late the loop wakes a timer: any blocking call on the loop shows up here."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - t0 - interval)
        metrics.loop_lag.observe(lag)
        if lag > worst:
            worst = lag
            metrics.loop_lag_max.set(lag)
        if lag > 0.05:
            logger.warning("event loop stalled for %.1f ms", lag * 1e3)


def load_runner(settings: Settings) -> EngineClient:
    """The one factory: the engine named in the settings, in process, or the Redis gateway to the
    workers' engines when ``redis_url`` is set (blocking: called in a worker thread)."""
    from ditstream.engine.config import BatchConfig, EngineConfig, ModelConfig

    if settings.redis_url:  # gateway mode: the engines are `ditstream worker` processes behind Redis
        from ditstream.server.scale.gateway import RedisGatewayRunner

        return RedisGatewayRunner.from_settings(settings)
    ecfg = EngineConfig(max_batch=settings.max_batch, output_queue_size=settings.output_queue_size,
                        max_pixels=settings.max_pixels, max_prompt_chars=settings.max_prompt_chars,
                        batching=BatchConfig(max_wait=settings.batch_wait))
    if settings.model == "null":
        from ditstream.engine.null import null_runner

        return null_runner(ecfg, delay_s=settings.null_delay_s)
    mcfg = ModelConfig(model=settings.model, backend=settings.backend, device=settings.device, dtype=settings.dtype)
    runner = EngineRunner.from_config(mcfg, ecfg)
    if settings.default_width is not None and settings.default_height is not None:
        # A backend without a size profile warms the size streams start at (a worker has no lifespan).
        runner.prefer_warmup_size(settings.default_width, settings.default_height)
    return runner


def _lifespan(state: AppState):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.runner is None:
            logger.info("loading model %r (backend %s)", state.settings.model, state.settings.backend)
            state.runner = await asyncio.to_thread(load_runner, state.settings)
        runner = state.runner
        runner.bind_metrics(state.metrics)
        d = state.stream_defaults()  # a backend without a size profile warms the size streams start at
        runner.prefer_warmup_size(int(d["width"]), int(d["height"]))
        runner.start()
        state.metrics.workers_up.set(1)
        if runner.warming:
            logger.info("engine started, warming %d shape(s) before /ready: %s", len(runner.warming), runner.info)
        else:
            logger.info("engine ready: %s", runner.info)
        lag_task = asyncio.create_task(_lag_monitor(state.metrics), name="ditstream-lag-monitor")
        try:
            yield
        finally:
            state.shutting_down = True
            await _drain_sessions(state)
            lag_task.cancel()
            await asyncio.to_thread(runner.stop)
            state.metrics.workers_up.set(0)
            state.codec.close()
            logger.info("server stopped")

    return lifespan


async def _drain_sessions(state: AppState) -> None:
    """Graceful shutdown: let streams finish for ``shutdown_grace_s``, then close them (1001)."""
    deadline = time.monotonic() + state.settings.shutdown_grace_s
    while state.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for session in list(state.sessions):
        session.request_close(1001, "server shutting down")
    for _ in range(40):
        if not state.sessions:
            break
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------ factory
def create_app(settings: Settings | None = None, runner: EngineClient | None = None) -> FastAPI:
    """Build the app. ``runner`` (not yet started) replaces the model named in ``settings``."""
    from ditstream.server import logsafe
    from ditstream.server.api import rest
    from ditstream.server.live import ws

    settings = settings or Settings()
    logsafe.install()  # uvicorn logs query strings (?token=<key>); rewrite them before any handler
    metrics = Metrics()
    state = AppState(settings=settings, metrics=metrics,
                     admission=Admission(settings.max_streams, settings.max_queued_jobs, metrics,
                                         settings.retry_after_s),
                     codec=Codec(settings.codec_threads), runner=runner)
    # No Swagger UI / ReDoc: FastAPI's pages load their JS and CSS from a CDN, so offline (the demo's
    # whole point) /docs would be a blank page. The schema itself is served: /openapi.json.
    app = FastAPI(title="ditstream", version="0.1.0", lifespan=_lifespan(state), docs_url=None, redoc_url=None,
                  description="Real-time streaming image generation: OpenAI Images API over REST and a "
                              "frame-in/frame-out WebSocket at /v1/stream (see docs/protocol.md).")
    app.state.ditstream = state

    @app.exception_handler(DitstreamError)
    async def _ditstream_error(request: Request, exc: DitstreamError) -> JSONResponse:
        row = mapping_for(exc)
        if row.http_status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return JSONResponse(rest_error_body(exc), status_code=row.http_status, headers=rest_headers(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own refusals (404, 405, an unreadable body) in the same error shape as ours.

        FastAPI turns any exception while reading a body into a bare 400; the cause tells the real
        story — the body limit tripping on a chunked upload (413) or JSON nested past the recursion
        limit (400 malformed_message).
        """
        cause = exc.__cause__
        if isinstance(cause, DitstreamError):
            return await _ditstream_error(request, cause)
        if exc.status_code == 400:
            return await _ditstream_error(request, MalformedMessageError(f"request body cannot be parsed: "
                                                                        f"{exc.detail}", field="body"))
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error" if exc.status_code < 500
                          else "server_error", "code": _HTTP_CODES.get(exc.status_code, "http_error"), "param": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "form"))
        if err.get("type") == "json_invalid":
            verr: ValidationError = MalformedMessageError(f"request body is not valid JSON: {err['msg']}",
                                                          field="body")
        else:
            verr = ValidationError(f"{where or 'body'}: {err['msg']} (got {err.get('input')!r:.80})",
                                   field=where or None)
        return JSONResponse(rest_error_body(verr), status_code=mapping_for(verr).http_status)

    app.include_router(rest.router)
    app.include_router(ws.router)

    @app.get("/health", tags=["ops"], summary="Liveness: the process answers and its engine has not died.",
             responses={503: {"description": "the engine died (e.g. an unrecoverable device error): restart me"}})
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "uptime_s": round(time.time() - state.started_at, 1)}
        error = state.runner.error if state.runner is not None else None
        if error is not None:  # a failed model call never gets here; only an engine that stopped for good
            body.update(status="engine_dead", error=repr(error)[:300])
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    @app.get("/ready", tags=["ops"], summary="Readiness: the model is loaded, warm, and the engine runs.",
             responses={503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        ok = state.ready
        warming = [] if ok or state.shutting_down else state.warming
        status = "ready" if ok else ("warming" if warming else "not_ready")
        body = {"status": status, "engine_alive": bool(state.runner and state.runner.alive),
                "shutting_down": state.shutting_down, "streams": len(state.sessions)}
        if warming:
            body["warming"] = warming
        if state.runner is not None and state.runner.error is not None:
            body["error"] = repr(state.runner.error)
        if state.runner is not None:  # gateway: Redis reachable, live workers
            body.update(state.runner.health())
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (prefix ditstream_).",
             response_class=PlainTextResponse)
    async def prometheus() -> Response:
        state.metrics.workers_up.set(state.runner.workers_up if state.runner is not None else 0)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    if WEB_DIR.is_dir():
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html")

    if settings.api_keys:
        _declare_bearer_auth(app)
    # Outermost first: metrics see every answer (auth refusals and 413s included).
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes + 256 * 1024)
    app.add_middleware(APIKeyMiddleware, keys=[k.get_secret_value() for k in settings.api_keys], metrics=metrics)
    if settings.cors_origins:  # off by default; outside auth so that preflights (no key) get an answer
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """With keys configured, the schema says so: a bearer scheme and a 401 on every guarded operation.

    The middleware, not a FastAPI dependency, enforces the keys (it covers WebSocket and 404s too),
    so FastAPI cannot see them; without this the schema would describe an open API.
    """
    from ditstream.server.api.auth import APIKeyMiddleware

    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        if "bearer" not in schemes:
            schemes["bearer"] = {"type": "http", "scheme": "bearer",
                                 "description": "An API key: `Authorization: Bearer <key>`."}
            for path, operations in schema.get("paths", {}).items():
                if APIKeyMiddleware.is_open(path):
                    continue
                for op in operations.values():
                    op["security"] = [{"bearer": []}]
                    op.setdefault("responses", {}).setdefault("401", {"description": "missing or invalid API key"})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
