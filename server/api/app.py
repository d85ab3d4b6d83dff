"""The FastAPI app factory: engine in the lifespan, middleware, routes and error handlers.

``create_app(settings, runner=None)`` builds a self-contained app: its own metrics registry,
admission pools and codec threads. Without ``runner`` the lifespan loads the model named in the
settings (in a worker thread: loading never blocks the event loop); tests pass a null or tiny
runner. The lifespan starts the engine thread and an event-loop lag monitor, and at shutdown turns
``/ready`` to 503, closes live streams (1012) after a grace period and stops the engine. ``hand_over``
is that same stop begun on SIGTERM, before uvicorn closes anything (``ditstream serve`` calls it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ditstream.engine.errors import DitstreamError, ValidationError
from ditstream.server.api.admission import Admission
from ditstream.server.api.auth import APIKeyMiddleware
from ditstream.server.api.factory import load_runner
from ditstream.server.api.middleware import HTTP_ERROR_CODES, BodyLimitMiddleware, MetricsMiddleware
from ditstream.server.api.state import AppState
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

logger = logging.getLogger(__name__)


WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"


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


#: The close code of a live stream whose server stops on purpose: RFC 6455's "service restart",
#: i.e. reconnect (with backoff) and reach another server; the reason says the same in words.
WS_SERVICE_RESTART, RESTART_REASON = 1012, "server restarting"


async def hand_over(state: AppState) -> None:
    """A stop on purpose (SIGTERM), run before uvicorn closes any socket.

    ``/ready`` answers 503 from now on (a load balancer takes this server out; new streams are refused
    with 1013), live streams get ``shutdown_grace_s`` to end by themselves, then each is closed with
    1012 — a WebRTC session told so on its ``control`` channel — so that its client reconnects
    through the load balancer to another server. REST requests keep being served meanwhile; uvicorn
    waits for those in flight afterwards. Without this, uvicorn would drop the sockets itself
    (``fail_connection``) while ``/ready`` still said 200.
    """
    state.shutting_down = True
    logger.info("handing over: /ready is 503; %d live stream(s) closed (1012) in %.1f s at most",
                len(state.sessions), state.settings.shutdown_grace_s)
    await _drain_sessions(state)


async def _drain_sessions(state: AppState) -> None:
    """Let streams finish for ``shutdown_grace_s``, then close them (1012, service restart)."""
    deadline = time.monotonic() + state.settings.shutdown_grace_s
    while state.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for session in list(state.sessions):
        session.request_close(WS_SERVICE_RESTART, RESTART_REASON)
    for _ in range(40):
        if not state.sessions:
            break
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------ factory
def create_app(settings: Settings | None = None, runner: EngineClient | None = None) -> FastAPI:
    """Build the app. ``runner`` (not yet started) replaces the model named in ``settings``."""
    from ditstream.server import logsafe
    from ditstream.server.api import outputs, rest
    from ditstream.server.live import webrtc, ws

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
                              "frame-in/frame-out WebSocket at /v1/stream, WebRTC over WHIP/WHEP at /v1/whip "
                              "and /v1/whep (see docs/protocol.md).")
    app.state.ditstream = state
    app.add_exception_handler(DitstreamError, _ditstream_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _request_validation)  # type: ignore[arg-type]
    app.include_router(rest.router)
    app.include_router(ws.router)
    app.include_router(webrtc.router)
    app.include_router(outputs.router)
    _add_ops_routes(app, state)
    if WEB_DIR.is_dir():
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
        app.add_api_route("/", _index, include_in_schema=False)
    if settings.api_keys:
        _declare_bearer_auth(app)
    _add_middleware(app, settings, metrics)
    return app


# ------------------------------------------------------------------------------------ error handlers
async def _ditstream_error(request: Request, exc: DitstreamError) -> JSONResponse:
    """Our errors, through the one table (``server/errors.py``): status, body, headers."""
    row = mapping_for(exc)
    if row.http_status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return JSONResponse(rest_error_body(exc), status_code=row.http_status, headers=rest_headers(exc))


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
                      else "server_error", "code": HTTP_ERROR_CODES.get(exc.status_code, "http_error"), "param": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body FastAPI could not parse into its model: 400 for bad JSON, else 422 naming the field."""
    err = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
    where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "form"))
    if err.get("type") == "json_invalid":
        verr: ValidationError = MalformedMessageError(f"request body is not valid JSON: {err['msg']}",
                                                      field="body")
    else:
        verr = ValidationError(f"{where or 'body'}: {err['msg']} (got {err.get('input')!r:.80})",
                               field=where or None)
    return JSONResponse(rest_error_body(verr), status_code=mapping_for(verr).http_status)


# ------------------------------------------------------------------------------------ ops routes
def _add_ops_routes(app: FastAPI, state: AppState) -> None:
    """``/health``, ``/ready`` and ``/metrics``: what an orchestrator and Prometheus read."""

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


async def _index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html")


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Outermost last added: metrics see every answer (auth refusals and 413s included)."""
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes + 256 * 1024)
    app.add_middleware(APIKeyMiddleware, keys=[k.get_secret_value() for k in settings.api_keys], metrics=metrics)
    if settings.cors_origins:  # off by default; outside auth so that preflights (no key) get an answer
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE", "PATCH"],
                           allow_headers=["Authorization", "Content-Type", "X-Ditstream-Config"],
                           expose_headers=["Retry-After", "Location", "X-Ditstream-Session"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)


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
