"""Backend limits and warm-up seen from outside: a size outside the engine's profile is refused when a
WS stream is configured or a REST job opens (naming the profile), in process and through a gateway
(which reads the profile from the worker's heartbeat and refuses it itself); ``/ready`` and a worker's health say "warming" (503) until
every shape is warm, then turn ready."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
import websockets
from ditstream.engine.backends import create_backend
from ditstream.engine.config import EngineConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.prompt_cache import PromptCache
from ditstream.engine.runner import EngineRunner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from serverkit import KINDS
from test_backend_limits import PROFILE, SIZE, LimitedBackend
from testkit import recv_json

from ditstream.bench.harness import ServerThread

PROFILE_MSG = f"outside this engine's profile: {SIZE}-{2 * SIZE} px, batch 1-8"


@pytest.fixture(scope="module")
def torch_backend(tiny_components):
    return create_backend("torch", tiny_components)


def _runner(tiny_components, torch_backend, gate: threading.Event | None = None) -> EngineRunner:
    backend = LimitedBackend(torch_backend, PROFILE, gate=gate)
    runner = EngineRunner(EngineCore(tiny_components, backend, PromptCache(tiny_components), EngineConfig()))
    runner.info = {"model": "tiny", "backend": backend.name, "size_multiple": runner.core.size_multiple,
                   "limits": PROFILE.as_dict()}
    return runner


def _app(runner: EngineRunner):
    return create_app(Settings(model="tiny", default_width=SIZE, default_height=SIZE), runner)


@contextlib.contextmanager
def _limited_server(request: pytest.FixtureRequest, kind: str, runner: EngineRunner) -> Iterator[ServerThread]:
    """``runner`` served in process ("engine"), or by an in-process ``Worker`` behind a gateway app on
    the module's ``redis_url`` ("gateway"): the worker's heartbeat carries the backend's profile, and the
    gateway's refusal must read as the engine's own (``tests/test_redis_profile.py`` checks nothing is queued)."""
    if kind == "engine":
        with ServerThread(_app(runner)) as srv:
            assert runner.wait_ready(30)
            yield srv
        return
    from ditstream.server.scale.config import ScaleConfig
    from ditstream.server.scale.worker import Worker

    from ditstream.bench.scale_harness import wait_for

    settings = Settings(model="tiny", default_width=SIZE, default_height=SIZE,
                        redis_url=request.getfixturevalue("redis_url"),
                        redis_prefix=f"lim{uuid.uuid4().hex[:8]}", worker_heartbeat_s=0.2, worker_ttl_s=2.0)
    worker = Worker(runner, ScaleConfig.from_settings(settings), worker_id="w-limited").start()
    try:
        with ServerThread(create_app(settings)) as srv:
            wait_for(lambda: httpx.get(srv.url + "/ready").status_code == 200, 60, what="the gateway ready")
            assert srv.app.state.ditstream.runner.info["mode"] == "gateway"
            yield srv
    finally:
        worker.stop(drain_s=0)


@pytest.mark.parametrize("kind", KINDS)
def test_sizes_outside_the_profile_are_refused_on_ws_and_rest(request, tiny_components, torch_backend, kind):
    runner = _runner(tiny_components, torch_backend)
    with _limited_server(request, kind, runner) as srv:

        async def ws_flow():
            async with websockets.connect(srv.ws_url, max_size=None) as ws:
                assert (await recv_json(ws))["type"] == "ready"
                await ws.send(json.dumps({"type": "config", "size": f"{4 * SIZE}x{SIZE}"}))
                err = await recv_json(ws)
                assert err["type"] == "error" and err["code"] == "validation_error", err
                assert f"size {4 * SIZE}x{SIZE} is {PROFILE_MSG}" in err["message"]
                await ws.send(json.dumps({"type": "config", "size": f"{2 * SIZE}x{SIZE}"}))  # the stream goes on
                ok = await recv_json(ws)
                assert ok["type"] == "config" and ok["applied"]["width"] == 2 * SIZE, ok

        asyncio.run(ws_flow())
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x", "size": f"{SIZE}x{4 * SIZE}"},
                       timeout=60)
        assert r.status_code == 422, r.text
        assert PROFILE_MSG in r.text
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x", "size": f"{SIZE}x{SIZE}"},
                       timeout=60)
        assert r.status_code == 200, r.text


def test_ready_is_503_while_warming_then_200(tiny_components, torch_backend):
    gate = threading.Event()
    runner = _runner(tiny_components, torch_backend, gate)
    try:
        with ServerThread(_app(runner)) as srv:
            assert runner.core.backend.warmup_started.wait(30)
            r = httpx.get(srv.url + "/ready")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "warming" and body["engine_alive"] is True
            assert body["warming"][-1] == f"batch 8 at {SIZE}x{SIZE}"
            assert httpx.get(srv.url + "/health").status_code == 200  # live, just not ready
            gate.set()
            assert runner.wait_ready(30)
            r = httpx.get(srv.url + "/ready")
            assert r.status_code == 200 and r.json()["status"] == "ready" and "warming" not in r.json()
    finally:
        gate.set()


def test_worker_stays_out_of_the_fleet_until_warm(tiny_components, torch_backend, tmp_path):
    from ditstream.server.scale.config import ScaleConfig
    from ditstream.server.scale.worker import Worker

    from ditstream.bench.scale_harness import RedisServer, redis_server_binary, wait_for

    if redis_server_binary() is None:
        pytest.fail("redis-server is required for the scale-out tests (apt-get install -y redis-server)",
                    pytrace=False)
    redis_srv = RedisServer(log_dir=tmp_path).start()
    gate = threading.Event()
    runner = _runner(tiny_components, torch_backend, gate)
    w = Worker(runner, ScaleConfig(redis_url=redis_srv.url, heartbeat_s=0.1, worker_ttl_s=2.0), worker_id="warmy")
    try:
        w.start()
        assert runner.core.backend.warmup_started.wait(30)
        ok, body = w.health()
        assert not ok and body["status"] == "warming" and body["warming"]
        assert not w.r.sismember(w.keys.workers, w.id)  # the gateway cannot pin sessions here yet
        gate.set()
        assert runner.wait_ready(30)
        wait_for(lambda: w.r.sismember(w.keys.workers, w.id), 10, what="worker registered once warm")
        ok, body = w.health()
        assert ok and body["status"] == "ok"
    finally:
        gate.set()
        w.stop(drain_s=0)
        redis_srv.stop()
