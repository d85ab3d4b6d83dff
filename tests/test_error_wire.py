"""Errors keep their meaning across Redis: every class of the one error table (``server/errors.py``)
crosses the wire (``server/scale/messages.py``) as the same class with the same code, status and
details, and a client of a gateway gets what a client of an in-process engine gets — for every class,
by REST (status, body, ``Retry-After``) and on a WebSocket (in-band message, close code).

The end-to-end half runs a real gateway app on a private ``redis-server`` in front of a real
``Worker`` whose engine raises, on request, any error of the table (``FaultCore``: a null core that
raises the class its config's prompt names), and the same engine in process.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from ditstream.engine.backends.null_backend import NullBackend
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.errors import DitstreamError, OverloadedError
from ditstream.engine.null import NullPrompts, null_components
from ditstream.engine.runner import EngineRunner
from ditstream.server.api.app import create_app
from ditstream.server.errors import all_error_classes, mapping_for, rest_error_body, rest_headers
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.messages import (
    ErrorInfo,
    JobResult,
    SessionReply,
    WireError,
    load_reply,
)
from ditstream.server.scale.worker import Worker
from ditstream.server.settings import Settings
from testkit import frame_message, jpeg, recv_frame, recv_json

from ditstream.bench.harness import ServerThread
from ditstream.bench.scale_harness import wait_for

CLASSES = all_error_classes()
SIZE = 64
RAISE = "raise:"


def make_error(cls: type[DitstreamError]) -> DitstreamError:
    """An instance of ``cls`` with every detail it can carry set to a value other than its default."""
    if issubclass(cls, OverloadedError):
        return cls(f"{cls.__name__} raised on purpose", retry_after=7.0, reason="test_reason", field="prompt")
    return cls(f"{cls.__name__} raised on purpose", field="prompt")


def _same(a: DitstreamError, b: DitstreamError) -> None:
    assert type(b) is type(a), f"{type(a).__name__} came back as {type(b).__name__}"
    assert (b.error_type, b.message, b.details()) == (a.error_type, a.message, a.details())
    assert mapping_for(b) == mapping_for(a)
    assert (rest_error_body(b), rest_headers(b), b.to_dict()) == (rest_error_body(a), rest_headers(a), a.to_dict())


# ------------------------------------------------------------------------------------ the wire alone
@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_error_class_crosses_the_wire_as_itself(cls: type[DitstreamError]) -> None:
    sent = make_error(cls)
    reply = load_reply(JobResult(job="j", worker="w", error=ErrorInfo.of(sent)).dump())
    assert isinstance(reply, JobResult) and reply.error is not None
    _same(sent, reply.error.to_exception())


def test_an_error_outside_the_table_travels_as_its_nearest_row_and_a_non_engine_error_as_a_generation_error():
    class Unlisted(OverloadedError):
        pass

    back = ErrorInfo.load(ErrorInfo.of(Unlisted("full", retry_after=3.0)).dump()).to_exception()
    assert type(back) is OverloadedError and back.retry_after == 3.0
    assert ErrorInfo.of(RuntimeError("boom")).to_exception().error_type == "generation_error"
    with pytest.raises(ValueError, match="unknown error class"):
        ErrorInfo.load(json.dumps({"error": "NoSuchError", "code": "x", "message": "m"}))
    with pytest.raises(WireError, match="has code"):  # two builds disagreeing about the table: loud
        ErrorInfo(error="ImageTooLargeError", code="payload_too_large", message="m").to_exception()


def test_replies_are_typed_by_their_kind_field():
    job = JobResult(job="j", worker="w")
    session = SessionReply(session="s", request="r", worker="w", config={"prompt": '"kind":"result"'})
    assert isinstance(load_reply(job.dump()), JobResult)
    assert isinstance(load_reply(session.dump()), SessionReply)  # a substring match would call it a result
    with pytest.raises(ValueError):
        load_reply(b'{"v": 3, "kind": "nonsense"}')


# ------------------------------------------------------------------------------------ end to end
class FaultCore(EngineCore):
    """The real core (on the null model) that raises ``make_error(<class>)`` for a job or reconfigure whose prompt is
    ``raise:<class name>`` (on the engine thread, as a real engine's error would be)."""

    @staticmethod
    def _maybe_raise(cfg: StreamConfig) -> None:
        if isinstance(cfg.prompt, str) and cfg.prompt.startswith(RAISE):
            name = cfg.prompt[len(RAISE):]
            raise make_error(next(c for c in CLASSES if c.__name__ == name))

    def add(self, cfg: StreamConfig, **kwargs: Any):
        if kwargs.get("one_shot"):
            self._maybe_raise(cfg)
        return super().add(cfg, **kwargs)

    def reconfigure(self, stream_id: str, cfg: StreamConfig) -> StreamConfig:
        self._maybe_raise(cfg)
        return super().reconfigure(stream_id, cfg)


def fault_runner() -> EngineRunner:
    components = null_components()
    runner = EngineRunner(FaultCore(components, NullBackend(components), NullPrompts(), EngineConfig()))
    runner.info = {"model": "null", "backend": "null", "device": "cpu", "dtype": "uint8",
                   "size_multiple": runner.core.size_multiple, "defaults": {}}
    return runner


def _settings(**kw: Any) -> Settings:
    return Settings(model="null", default_width=SIZE, default_height=SIZE, **kw)


@pytest.fixture(scope="module", params=["engine", "gateway"])
def server(request: pytest.FixtureRequest, redis_url: str) -> Iterator[ServerThread]:
    if request.param == "engine":
        with ServerThread(create_app(_settings(), fault_runner())) as srv:
            yield srv
        return
    settings = _settings(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:8]}", worker_heartbeat_s=0.2,
                         worker_ttl_s=2.0, job_claim_idle_s=2.0)
    worker = Worker(fault_runner().start(), ScaleConfig.from_settings(settings), worker_id="faulty").start()
    try:
        with ServerThread(create_app(settings)) as srv:
            gateway = srv.app.state.ditstream.runner
            assert gateway.info["mode"] == "gateway"
            wait_for(lambda: "faulty" in gateway.workers and httpx.get(srv.url + "/ready").status_code == 200, 30,
                     what="the gateway sees the worker")
            yield srv
    finally:
        worker.stop()
        worker.runner.stop()


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_rest_client_gets_the_tables_status_body_and_headers_for_every_class(server, cls) -> None:
    r = httpx.post(server.url + "/v1/images/generations", timeout=30,
                   json={"prompt": RAISE + cls.__name__, "size": f"{SIZE}x{SIZE}", "n": 1})
    want = make_error(cls)
    assert r.status_code == mapping_for(cls).http_status, r.text
    got, expected = r.json()["error"], rest_error_body(want)["error"]
    # A worker retries a failed model call elsewhere, then says how often it failed: "job … failed 3 times: …"
    assert got.pop("message").endswith(expected.pop("message")), r.text
    assert got == expected
    for name, value in rest_headers(want).items():
        assert r.headers.get(name) == value, name


async def _config_error(url: str, cls: type[DitstreamError]) -> tuple[dict[str, Any], int | None]:
    """Open a stream, ask for a config whose reconfigure raises ``cls``: the in-band error and the close
    code (``None`` when the stream goes on)."""
    async with websockets.connect(url) as ws:
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send(json.dumps({"type": "config", "prompt": RAISE + cls.__name__}))
        err = await recv_json(ws)
        code = None
        if mapping_for(cls).ws_close is not None:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            code = closed.value.rcvd.code
        else:
            await ws.send(json.dumps({"type": "ping", "ts": 1}))
            assert (await recv_json(ws))["type"] == "pong"  # the stream goes on
        return err, code


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_ws_client_gets_the_same_in_band_error_and_close_code_for_every_class(server, cls) -> None:
    err, code = asyncio.run(_config_error(server.ws_url, cls))
    want = make_error(cls)
    assert err == want.to_dict()  # code, message, field — and retry_after for Overloaded
    assert code == mapping_for(cls).ws_close


async def _bad_then_good_frame(url: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A frame whose header is sound but whose body cannot be decoded (a JPEG cut after its scan
    header: the gateway checks headers and relays bytes, so only the worker's decoder finds it),
    then a good one: the errors before the good frame's output, and that output's header."""
    rng = np.random.default_rng(0)
    good = jpeg(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    cut = good[:good.index(b"\xff\xda") + 20]
    async with websockets.connect(url) as ws:
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send(frame_message(cut, 1, ts=123.5))
        texts = [await recv_json(ws)]
        await ws.send(frame_message(good, 2))
        head, _img = await recv_frame(ws, texts=texts)
        return [t for t in texts if t.get("type") == "error"], head


def test_a_frame_only_the_worker_can_refuse_gets_the_same_in_band_error(server) -> None:
    """In process the intake's decoder refuses it; behind a gateway the worker's does, and the error
    comes back on the session's output stream in that frame's place — not only into a log."""
    errors, last = asyncio.run(_bad_then_good_frame(server.ws_url))
    assert errors == [{"type": "error", "code": "invalid_image", "field": "image", "seq": 1, "ts": 123.5,
                       "message": "corrupt JPEG image: ValueError: Premature end of JPEG file"}]
    assert last["seq"] == 2  # the stream went on
