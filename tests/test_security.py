"""Security properties, each proven against the real app rather than read from the code.

* Every route, found by walking ``app.routes`` (a route added later is covered automatically), refuses
  a request without a key, with a wrong key and with a key where it is not accepted; only the
  documented open paths answer. Path tricks (``/web/../v1/models``, ``//v1/models``, case) do not
  reach a guarded endpoint.
* Keys are held only as sha256 digests and every configured digest is compared with
  ``hmac.compare_digest`` (no early exit, so timing does not reveal which key matched or how much).
* CORS is off by default and configurable.
* Limits: pixels, body size, prompt length, WebSocket frame and control message size.
* Logs — ours, uvicorn's, at debug level — never contain a key or image bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from ditstream.engine.config import EngineConfig
from ditstream.engine.null import null_runner
from ditstream.server.api import auth as auth_module
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from fastapi.testclient import TestClient
from PIL import Image
from starlette.routing import Mount
from starlette.websockets import WebSocketDisconnect
from testkit import frame_message, jpeg, recv_frame, recv_json

from ditstream.bench.harness import ServerThread

KEY = "sk-sec-Zq81xYw3-secret"
WRONG = "sk-sec-wrong-guess-00"
#: Paths that answer without a key (docs/protocol.md); everything else must be guarded.
OPEN = {"/health", "/ready", "/metrics", "/", "/web"}


# ------------------------------------------------------------------------------------ route walk
def walk_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str, frozenset[str]]]:
    """(kind, path, methods) of every route, through included routers and mounts.

    FastAPI ≥ 0.16x keeps included routers as one ``_IncludedRouter`` entry instead of copying their
    routes into ``app.routes``; both layouts are handled (duck-typed) so the walk never silently
    finds nothing.
    """
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:  # an included router
            inner = prefix + (getattr(getattr(route, "include_context", None), "prefix", "") or "")
            yield from walk_routes([c.original_route for c in contexts()], inner)
        elif isinstance(route, Mount):
            yield "mount", prefix + route.path, frozenset()
        elif getattr(route, "methods", None):
            yield "http", prefix + route.path, frozenset(route.methods)
        elif hasattr(route, "path"):
            yield "websocket", prefix + route.path, frozenset()


@pytest.fixture(scope="module")
def keyed_app() -> Any:
    return create_app(Settings(model="null", default_width=64, default_height=64, api_keys=[KEY]), null_runner())


async def _raw_http(app: Any, method: str, path: str, headers: dict[str, str] | None = None,
                    query: str = "") -> int:
    """One request straight into the ASGI app: no client-side path normalisation, no network."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "path": path, "raw_path": path.encode(), "root_path": "", "scheme": "http",
             "query_string": query.encode(), "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent: list[dict[str, Any]] = []
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(5)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def _probe_path(kind: str, path: str) -> str:
    return path + "/index.html" if kind == "mount" else path


def test_route_walk_finds_every_route(keyed_app):
    """The walk is the test's foundation: it must see every documented route and the socket."""
    found = {path for _, path, _ in walk_routes(keyed_app.routes)}
    assert set(keyed_app.openapi()["paths"]) <= found
    assert {"/v1/stream", "/", "/web", "/openapi.json"} <= found
    # No Swagger UI or ReDoc: their assets come from a CDN (blank offline); the schema is /openapi.json.
    assert not {"/docs", "/redoc", "/docs/oauth2-redirect"} & found


def test_openapi_operation_ids_are_unique(keyed_app):
    """OpenAPI requires one operationId per operation (client generators key methods by it); FastAPI
    gives a route serving two methods the same id twice, with only a warning."""
    ids = [op["operationId"] for item in keyed_app.openapi()["paths"].values()
           for op in item.values() if isinstance(op, dict) and "operationId" in op]
    assert ids and len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_every_http_route_needs_a_key_unless_documented_open(keyed_app):
    async def main() -> dict[str, set[int]]:
        answers: dict[str, set[int]] = {}
        for kind, path, methods in walk_routes(keyed_app.routes):
            if kind == "websocket":
                continue
            probe = _probe_path(kind, path)
            for method in sorted(methods | {"GET", "POST", "DELETE"}):
                for headers, query in (({}, ""), ({"Authorization": f"Bearer {WRONG}"}, ""),
                                       ({"Authorization": KEY}, ""),  # no "Bearer " scheme
                                       ({"Authorization": f"Basic {KEY}"}, ""),
                                       ({}, f"token={KEY}"),  # query tokens are for WebSockets only
                                       ({"Sec-WebSocket-Protocol": f"ditstream.bearer.{KEY}"}, "")):
                    answers.setdefault(path, set()).add(await _raw_http(keyed_app, method, probe, headers, query))
        return answers

    answers = asyncio.run(main())
    guarded = {p for p, codes in answers.items() if codes == {401}}
    open_ = {p for p, codes in answers.items() if 401 not in codes}
    assert open_ == OPEN, f"routes answering without a key: {sorted(open_)}"
    assert guarded == set(answers) - OPEN, {p: c for p, c in answers.items() if p not in guarded | open_}
    assert {"/v1/models", "/v1/images/generations", "/v1/images/edits", "/openapi.json"} <= guarded


def test_the_right_key_opens_every_guarded_route(keyed_app):
    """Positive control: the refusals above come from the key, not from a broken route."""
    async def main() -> dict[str, int]:
        codes = {}
        for kind, path, methods in walk_routes(keyed_app.routes):
            if kind == "http" and path not in OPEN:
                method = "GET" if "GET" in methods else sorted(methods)[0]
                codes[path] = await _raw_http(keyed_app, method, path, {"Authorization": f"Bearer {KEY}"})
        return codes

    codes = asyncio.run(main())
    assert codes and all(c != 401 for c in codes.values()), codes


@pytest.mark.parametrize("path", ["/web/../v1/models", "/web/%2e%2e/v1/models", "//v1/models", "/v1//models",
                                  "/V1/MODELS", "/health/../v1/models", "/v1/models/", "/nope", "/metrics/../docs"])
def test_path_tricks_do_not_bypass_auth(keyed_app, path):
    status = asyncio.run(_raw_http(keyed_app, "GET", path))
    assert status in (401, 404, 405), f"{path} answered {status} without a key"


def test_every_websocket_route_refuses_without_a_valid_key(keyed_app):
    client = TestClient(keyed_app)  # no lifespan needed: the middleware refuses before the route
    ws_paths = [p for kind, p, _ in walk_routes(keyed_app.routes) if kind == "websocket"]
    assert ws_paths == ["/v1/stream"]
    for path in ws_paths:
        for headers, subprotocols, query in (({}, None, ""), ({"Authorization": f"Bearer {WRONG}"}, None, ""),
                                             ({}, ["ditstream", f"ditstream.bearer.{WRONG}"], ""),
                                             ({}, None, f"?token={WRONG}")):
            with client.websocket_connect(path + query, headers=headers, subprotocols=subprotocols) as ws:
                msg = ws.receive_json()
                assert msg["type"] == "error" and msg["code"] == "unauthorized"
                assert KEY not in json.dumps(msg) and WRONG not in json.dumps(msg)
                with pytest.raises(WebSocketDisconnect) as info:
                    ws.receive_text()
                assert info.value.code == 1008


# ------------------------------------------------------------------------------------ key storage
def test_keys_are_held_as_digests_and_compared_in_constant_time(monkeypatch):
    mw = auth_module.APIKeyMiddleware(app=None, keys=[KEY, "sk-second-key"], metrics=None)  # type: ignore[arg-type]
    state = repr(vars(mw))
    assert KEY not in state and KEY.encode() not in b"".join(mw._digests)
    assert mw._digests == [hashlib.sha256(KEY.encode()).digest(), hashlib.sha256(b"sk-second-key").digest()]

    calls: list[tuple[bytes, bytes]] = []
    real = auth_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    for token, expected in ((KEY, True), ("sk-second-key", True), (WRONG, False), ("", False),
                            (KEY[:-1], False), (KEY + "x", False)):
        calls.clear()
        assert mw.is_valid(token) is expected
        # every configured digest compared, always against the digest (fixed length), never the raw key
        assert len(calls) == 2, f"early exit for {token!r}"
        assert all(len(a) == len(b) == 32 for a, b in calls)


def test_settings_never_show_keys():
    s = Settings(model="null", api_keys=[KEY])
    for text in (repr(s), str(s), json.dumps(s.public(), default=str)):
        assert KEY not in text
    app = create_app(s, null_runner())
    assert KEY not in json.dumps(app.openapi())


# ------------------------------------------------------------------------------------ CORS
def _preflight(app: Any, origin: str = "https://evil.example") -> httpx.Response:
    return TestClient(app).options("/v1/images/generations", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_by_default():
    app = create_app(Settings(model="null"), null_runner())
    assert Settings(model="null").cors_origins == []
    r = _preflight(app)
    assert "access-control-allow-origin" not in r.headers
    r = TestClient(app).get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_is_configurable_and_answers_preflights_without_a_key(monkeypatch):
    monkeypatch.setenv("DITSTREAM_CORS_ORIGINS", "https://app.example, https://other.example")
    s = Settings(model="null", api_keys=[KEY])
    assert s.cors_origins == ["https://app.example", "https://other.example"]
    app = create_app(s, null_runner())
    r = _preflight(app, "https://app.example")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in _preflight(app, "https://evil.example").headers
    # a real request from an allowed origin still needs the key, and the browser can read the 401
    r = TestClient(app).get("/v1/models", headers={"Origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"


# ------------------------------------------------------------------------------------ limits
@pytest.fixture(scope="module")
def limited_server() -> Iterator[ServerThread]:
    settings = Settings(model="null", default_width=64, default_height=64, max_pixels=128 * 128,
                        max_upload_bytes=32 * 1024, max_prompt_chars=50, max_frame_bytes=16 * 1024,
                        max_control_bytes=1024, api_keys=[KEY])
    app = create_app(settings, null_runner(EngineConfig(max_pixels=128 * 128)))
    with ServerThread(app) as srv:
        yield srv


AUTH = {"Authorization": f"Bearer {KEY}"}


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,kwargs,status,param", [
    ("prompt too long", {"json": {"prompt": "x" * 51}}, 422, "prompt"),
    ("generated pixels", {"json": {"prompt": "x", "size": "256x256"}}, 422, "size"),
    ("body too big", {"content": b"{" + b" " * (400 * 1024) + b"}", "headers": {"Content-Type": "application/json"}},
     413, "body"),
    ("upload pixels", {"files": {"image": ("a.png", _png(256, 256), "image/png")}, "data": {"prompt": "x"}},
     413, "image"),
    ("upload bytes", {"files": {"image": ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(40 * 1024), "image/png")},
                      "data": {"prompt": "x"}}, 413, "image"),
])
def test_rest_limits(limited_server, name, kwargs, status, param):
    route = "/v1/images/edits" if "files" in kwargs else "/v1/images/generations"
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = httpx.post(limited_server.url + route, headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("name,message,close", [
    ("frame too big", b"\xff\xd8\xff" + bytes(17 * 1024), 1009),
    ("control too big", json.dumps({"type": "config", "prompt": "y" * 2000}), 1009),
])
def test_ws_message_limits_close_the_socket(limited_server, name, message, close):
    async def main() -> None:
        async with websockets.connect(limited_server.ws_url, additional_headers=AUTH, max_size=None) as ws:
            assert (await recv_json(ws))["type"] == "ready"
            await ws.send(message)
            err = await recv_json(ws)
            assert err["code"] == "payload_too_large"
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == close

    asyncio.run(main())


def test_ws_frame_over_max_pixels_is_refused(limited_server):
    async def main() -> None:
        async with websockets.connect(limited_server.ws_url, additional_headers=AUTH, max_size=None) as ws:
            assert (await recv_json(ws))["type"] == "ready"
            await ws.send(json.dumps({"type": "config", "size": "256x256"}))
            err = await recv_json(ws)
            assert err["type"] == "error" and err["field"] == "size"  # a config over the limit: refused, goes on
            await ws.send(frame_message(jpeg(np.zeros((256, 256, 3), np.uint8), 30), 0))
            err = await recv_json(ws)
            assert err["code"] == "invalid_image" and err["field"] == "image"  # refused, the stream goes on
            await ws.send(frame_message(jpeg(np.zeros((64, 64, 3), np.uint8), 30), 1))
            header, _ = await recv_frame(ws)
            assert header["seq"] == 1

    asyncio.run(main())


# ------------------------------------------------------------------------------------ logs
CLIENT_LOGGERS = ("httpx", "httpcore", "websockets.client")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(CLIENT_LOGGERS):  # the test's own clients may log what they send
            return
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")


def test_logs_never_contain_keys_or_image_bytes():
    """Every way a key can arrive, valid and wrong, plus frames and uploads, with all loggers at DEBUG."""
    marker = bytes(range(256))  # unmistakable bytes hidden inside the "images"
    tagged_jpeg = jpeg(np.full((64, 64, 3), 90, np.uint8)) + marker  # trailing bytes: still decodes
    bogus = b"\xff\xd8\xff\xe0" + marker * 4  # JPEG magic, corrupt body: an error that quotes nothing
    needles = [KEY, WRONG, marker[16:48].hex(), marker[16:48].hex(" "), repr(marker[16:48])[2:-1],
               base64.b64encode(marker[:48]).decode()[:40], "89 50 4e 47", "ff d8 ff"]

    capture = _Capture()
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "websockets", "ditstream.server", "ditstream.engine"]
    app = create_app(Settings(model="null", default_width=64, default_height=64, api_keys=[KEY]), null_runner())
    with ServerThread(app) as srv:
        saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
        for n in names:
            logging.getLogger(n).setLevel(logging.DEBUG)
            logging.getLogger(n).addHandler(capture)
            logging.getLogger(n).propagate = False
        try:
            _exercise(srv, tagged_jpeg, bogus)
        finally:
            for n, (level, propagate) in saved.items():
                logging.getLogger(n).removeHandler(capture)
                logging.getLogger(n).setLevel(level)
                logging.getLogger(n).propagate = propagate
    text = "\n".join(capture.lines)
    assert "WebSocket /v1/stream" in text or "refused" in text, "the capture saw nothing: test is blind"
    for needle in needles:
        assert needle not in text, f"{needle!r} found in logs:\n" + "\n".join(
            line for line in capture.lines if needle in line)[:2000]


def _exercise(srv: ServerThread, tagged_jpeg: bytes, bogus: bytes) -> None:
    png = _png(64, 64)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        c.get("/v1/models", headers={"Authorization": f"Bearer {WRONG}"})
        c.get("/v1/models", params={"token": KEY})
        c.get("/v1/models?api_key=" + WRONG)
        c.post("/v1/images/generations", headers=AUTH, json={"prompt": "x", "size": "64x64"})
        c.post("/v1/images/edits", headers=AUTH, data={"prompt": "x"},
               files={"image": ("a.jpg", tagged_jpeg, "image/jpeg")})
        c.post("/v1/images/edits", headers=AUTH, data={"prompt": "x"}, files={"image": ("b.jpg", bogus, "image/jpeg")})
        c.post("/v1/images/edits", headers=AUTH, data={"prompt": "x"}, files={"image": ("c.png", png, "image/png")})

    async def sockets() -> None:
        for kwargs, url in (({"additional_headers": AUTH}, srv.ws_url),
                            ({"subprotocols": ["ditstream", f"ditstream.bearer.{KEY}"]}, srv.ws_url),
                            ({}, srv.ws_url + f"?token={KEY}"),
                            ({}, srv.ws_url + f"?token={WRONG}")):
            async with websockets.connect(url, max_size=None, **kwargs) as ws:
                first = await recv_json(ws)
                if first["type"] != "ready":
                    continue
                await ws.send(frame_message(tagged_jpeg, 0))
                await recv_frame(ws)
                await ws.send(bogus)
                assert (await recv_json(ws))["code"] == "invalid_image"
                await ws.send(b"\x00\x00\x00\x02{}" + bogus)  # header-framed corrupt image
                await recv_json(ws)

    asyncio.run(sockets())


def test_chunked_body_over_the_limit_and_deep_json_get_our_errors():
    """Without Content-Length the body limit trips while FastAPI reads the body: still a 413, in our shape."""
    app = create_app(Settings(model="null", max_upload_bytes=1024), null_runner())

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt":"'
        for _ in range(400):
            yield b"x" * 1024
        yield b'"}'

    with TestClient(app) as client:
        r = client.post("/v1/images/generations", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = client.post("/v1/images/generations", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_message"
        r = client.delete("/v1/models")
        assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]["code"] == "method_not_allowed"
