"""The error table, and the bad-input table: each bad input gets its documented error while another
live stream on the same server keeps receiving frames. The server tests run twice
(``tests/serverkit.py``): with the engine in process and as a gateway in front of a null worker."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import websockets
from ditstream.engine.errors import ALL_ERRORS
from ditstream.engine.null import null_runner
from ditstream.server.errors import ERROR_TABLE, SERVER_ERRORS, mapping_for
from serverkit import KINDS, serve
from testkit import frame_message, jpeg, recv_frame, recv_json

from ditstream.bench.harness import ServerThread

KEY = "k-" + "x" * 30
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZE = 64
MAX_FRAME = 32 * 1024


def test_every_error_class_has_a_mapping():
    for cls in (*ALL_ERRORS, *SERVER_ERRORS):
        assert cls in ERROR_TABLE, f"{cls.__name__} has no row in server.errors.ERROR_TABLE"
        row = mapping_for(cls)
        assert 400 <= row.http_status < 600
        assert row.ws_close is None or 1000 <= row.ws_close < 5000


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The same settings in process and as a gateway on the null fleet (``tests/serverkit.py``)."""
    with serve(request, "null_fleet", null_runner, model="null", api_keys=[KEY], default_width=SIZE,
               default_height=SIZE, max_frame_bytes=MAX_FRAME, max_upload_bytes=MAX_FRAME, max_prompt_chars=100,
               max_pixels=128 * 128) as srv:
        yield srv


def _img(size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)


GOOD = jpeg(_img())

# (name, what to send, in-band error code, close code or None when the stream goes on)
WS_ROWS = [
    ("corrupt image", GOOD[:40] + os.urandom(200), "invalid_image", None),
    ("non-image bytes", b"hello, this is not an image at all", "invalid_image", None),
    ("image over the size limit", b"\xff\xd8\xff" + os.urandom(MAX_FRAME + 10), "payload_too_large", 1009),
    ("image over the pixel limit", jpeg(_img((256, 256))), "invalid_image", None),
    ("wrong dimensions", jpeg(_img((32, 64))), "validation_error", None),
    ("malformed JSON", '{"type": "config", "prompt": ', "malformed_message", None),
    ("unknown control type", json.dumps({"type": "dance"}), "unknown_message_type", None),
    ("unknown config field", json.dumps({"type": "config", "colour": "red"}), "validation_error", None),
    ("over-long prompt", json.dumps({"type": "config", "prompt": "x" * 101}), "validation_error", None),
]


class LiveStream:
    """Another client streaming frames lock-step the whole time; counts what it gets back."""

    def __init__(self, url: str) -> None:
        self.url, self.received, self.task, self.stopping = url, 0, None, False

    async def __aenter__(self) -> LiveStream:
        self.ws = await websockets.connect(self.url, additional_headers=AUTH)
        assert (await recv_json(self.ws))["type"] == "ready"
        self.task = asyncio.create_task(self._run())
        await self.wait_for(3)
        return self

    async def _run(self) -> None:
        seq = 0
        while not self.stopping:
            await self.ws.send(frame_message(GOOD, seq))
            header, _ = await recv_frame(self.ws)
            assert header["seq"] == seq
            seq += 1
            self.received += 1

    async def wait_for(self, n: int, timeout: float = 30) -> None:
        async def _wait() -> None:
            while self.received < n:
                if self.task.done():
                    self.task.result()
                await asyncio.sleep(0.005)
        await asyncio.wait_for(_wait(), timeout)

    async def __aexit__(self, *exc) -> None:
        self.stopping = True  # a cancel can be swallowed by wait_for (Python 3.11): stop the loop too
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=10)
        if self.task.done() and not self.task.cancelled():
            self.task.exception()  # retrieved: no "never retrieved" noise
        await self.ws.close()


@pytest.mark.parametrize(("name", "payload", "code", "close"), WS_ROWS, ids=[r[0] for r in WS_ROWS])
def test_ws_bad_input(server, name, payload, code, close):
    async def main():
        async with LiveStream(server.ws_url) as live:
            ws = await websockets.connect(server.ws_url, additional_headers=AUTH, max_size=None)
            await recv_json(ws)
            await ws.send(payload)
            err = await recv_json(ws)
            assert (err["type"], err["code"]) == ("error", code), err
            assert err["message"]
            at_error = live.received
            if close is None:  # bad input: the stream goes on
                await ws.send(frame_message(GOOD, 77))
                header, _ = await recv_frame(ws)
                assert header["seq"] == 77
            else:  # abuse: closed with the documented code
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await ws.recv()
                assert info.value.rcvd.code == close
            await live.wait_for(at_error + 3)  # the other stream kept being served
            await ws.close()

    asyncio.run(main())


@pytest.mark.parametrize("credentials", ["missing", "wrong header", "wrong token", "wrong subprotocol"])
def test_ws_refuses_missing_or_wrong_key_with_1008(server, credentials):
    kwargs: dict = {
        "missing": {},
        "wrong header": {"additional_headers": {"Authorization": "Bearer nope"}},
        "wrong token": {"uri": server.ws_url + "?token=nope"},
        "wrong subprotocol": {"subprotocols": ["ditstream", "ditstream.bearer.nope"]},
    }[credentials]

    async def main():
        async with LiveStream(server.ws_url) as live:
            ws = await websockets.connect(kwargs.pop("uri", server.ws_url), **kwargs)
            err = await recv_json(ws)
            assert err["code"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1008
            at_error = live.received
            await live.wait_for(at_error + 3)

    asyncio.run(main())


@pytest.mark.parametrize("how", ["header", "token", "subprotocol"])
def test_ws_accepts_the_key_each_way(server, how):
    kwargs: dict = {
        "header": {"additional_headers": AUTH},
        "token": {"uri": server.ws_url + f"?token={KEY}"},
        "subprotocol": {"subprotocols": ["ditstream", f"ditstream.bearer.{KEY}"]},
    }[how]

    async def main():
        ws = await websockets.connect(kwargs.pop("uri", server.ws_url), **kwargs)
        assert (await recv_json(ws))["type"] == "ready"
        if how == "subprotocol":
            assert ws.subprotocol == "ditstream"  # the key itself is never echoed
        await ws.send(frame_message(GOOD, 1))
        assert (await recv_frame(ws))[0]["seq"] == 1
        await ws.close()

    asyncio.run(main())


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# (name, request kwargs for POST, status, error code)
REST_ROWS = [
    ("corrupt image", ("edits", {"files": {"image": ("a.png", _png(_img())[:60] + b"\0" * 50, "image/png")},
                                 "data": {"prompt": "x"}}), 400, "invalid_image"),
    ("non-image bytes", ("edits", {"files": {"image": ("a.txt", b"plain text", "text/plain")},
                                   "data": {"prompt": "x"}}), 400, "invalid_image"),
    ("image over the size limit", ("edits", {"files": {"image": ("a.jpg", b"\xff\xd8\xff" + os.urandom(MAX_FRAME + 1),
                                                                 "image/jpeg")}, "data": {"prompt": "x"}}),
     413, "payload_too_large"),
    ("image over the pixel limit", ("edits", {"files": {"image": ("a.png", _png(_img((256, 256))), "image/png")},
                                              "data": {"prompt": "x"}}), 413, "invalid_image"),
    ("wrong dimensions", ("generations", {"json": {"prompt": "x", "size": "63x64"}}), 422, "validation_error"),
    ("malformed JSON", ("generations", {"content": b'{"prompt": ', "headers": {"content-type": "application/json"}}),
     400, "malformed_message"),
    ("over-long prompt", ("generations", {"json": {"prompt": "x" * 101}}), 422, "validation_error"),
    ("missing prompt", ("generations", {"json": {"n": 1}}), 422, "validation_error"),
    ("url response format", ("generations", {"json": {"prompt": "x", "response_format": "url"}}), 422,
     "validation_error"),
]


@pytest.mark.parametrize(("name", "request_", "status", "code"), REST_ROWS, ids=[r[0] for r in REST_ROWS])
def test_rest_bad_input(server, name, request_, status, code):
    route, kwargs = request_
    kwargs = dict(kwargs)  # the row is shared by both server kinds: take the headers from a copy
    headers = {**AUTH, **kwargs.pop("headers", {})}

    async def main():
        async with LiveStream(server.ws_url) as live:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                r = await client.post(f"/v1/images/{route}", headers=headers, **kwargs)
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code
            await live.wait_for(live.received + 3)

    asyncio.run(main())


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc"])
def test_rest_refuses_missing_or_wrong_key_with_401(server, auth):
    headers = {"Authorization": auth} if auth else {}
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "unauthorized"
    ok = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x"}, headers=AUTH, timeout=30)
    assert ok.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # open paths stay open
    assert httpx.get(server.url + "/metrics").status_code == 200
