"""A stream config is validated once, at the server's edge, against typed limits (``engine/limits.py``):
the layers below (runner, core) take it on trust, the gateway validates against what its workers
advertise, and a config that never passed an edge is still checked where it enters the engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import websockets
from ditstream.engine.backends.base import BackendLimits
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.errors import ValidationError
from ditstream.engine.limits import EngineLimits, check_input, ensure_valid, validate_stream
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.gateway import RedisGatewayRunner
from ditstream.server.scale.messages import Heartbeat
from ditstream.server.settings import Settings
from testkit import recv_json

from ditstream.bench.harness import ServerThread

SIZE = 64


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[StreamConfig]:
    """Every run of the field checks (``StreamConfig.validate``), recorded."""
    seen: list[StreamConfig] = []
    real = StreamConfig.validate

    def spy(self: StreamConfig, **kw):
        seen.append(self)
        return real(self, **kw)

    monkeypatch.setattr(StreamConfig, "validate", spy)
    return seen


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(create_app(Settings(model="null", default_width=SIZE, default_height=SIZE), null_runner())) as srv:
        yield srv


def test_a_stream_open_and_a_reconfigure_each_validate_once(server, checks) -> None:
    async def main() -> tuple[int, int]:
        async with websockets.connect(server.ws_url) as ws:
            assert (await recv_json(ws))["type"] == "ready"
            opened = len(checks)
            await ws.send(json.dumps({"type": "config", "prompt": "a new prompt", "steps": 2}))
            reply = await recv_json(ws)
            assert reply["type"] == "config" and reply["applied"]["steps"] == 2, reply
            return opened, len(checks) - opened

    opened, reconfigured = asyncio.run(main())
    assert (opened, reconfigured) == (1, 1), f"open validated {opened} times, reconfigure {reconfigured}"


def test_a_job_validates_once(server, checks) -> None:
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "p", "size": f"{SIZE}x{SIZE}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(checks) == 1


def test_a_config_that_skipped_the_edge_is_checked_where_it_enters_the_engine(checks) -> None:
    runner = null_runner().start()
    try:
        with pytest.raises(ValidationError, match="steps"):
            runner.add_stream(StreamConfig(prompt="x", steps=9, width=SIZE, height=SIZE))
        h = runner.add_stream(StreamConfig(prompt="x", width=SIZE, height=SIZE))
        with pytest.raises(ValidationError, match="img2img needs an input image"):
            h.submit(None)
        h.close()
    finally:
        runner.stop()


def test_a_receipt_counts_only_for_limits_it_was_checked_against() -> None:
    cfg = StreamConfig(prompt="x", width=256, height=256)
    validate_stream(cfg, EngineLimits(size_multiple=8))
    assert ensure_valid(cfg, EngineLimits(size_multiple=8)) is cfg
    with pytest.raises(ValidationError, match="pixels; the limit is 4096"):
        ensure_valid(cfg, EngineLimits(size_multiple=8, max_pixels=64 * 64))
    with pytest.raises(ValidationError, match="multiple of 512"):
        ensure_valid(cfg, EngineLimits(size_multiple=512))
    with pytest.raises(ValidationError, match="outside this engine's profile"):
        ensure_valid(cfg, EngineLimits(size_multiple=8, profile=BackendLimits(width=(32, 128), height=(32, 128))))


def test_img2img_needs_an_image_and_txt2img_none() -> None:
    check_input(StreamConfig(mode="txt2img", width=SIZE, height=SIZE), None)
    with pytest.raises(ValidationError) as err:
        check_input(StreamConfig(mode="img2img", width=SIZE, height=SIZE), None)
    assert err.value.field == "image"


def test_the_gateway_validates_against_what_its_workers_advertise() -> None:
    advertised = EngineLimits(size_multiple=8, profile=BackendLimits(max_batch=4, width=(32, 64), height=(32, 64),
                                                                     sizes=((64, 64),)), loras=("swap",))
    beat = Heartbeat.load(Heartbeat(worker="w1", limits=advertised).dump())
    assert beat.limits == advertised, "the limits survive the heartbeat's JSON"
    gw = RedisGatewayRunner(ScaleConfig(redis_url="redis://127.0.0.1:1/0"), EngineConfig(max_prompt_chars=50))
    gw.fleet.workers = {"w1": beat}
    limits = gw.limits
    assert limits.profile == advertised.profile and limits.max_prompt_chars == 50
    validate_stream(StreamConfig(prompt="p", width=64, height=64, loras={"swap": 1.0}), limits)
    with pytest.raises(ValidationError, match="outside this engine's profile"):
        validate_stream(StreamConfig(prompt="p", width=96, height=64), limits)
    with pytest.raises(ValidationError, match="unknown LoRA 'other'"):
        validate_stream(StreamConfig(prompt="p", width=64, height=64, loras={"other": 1.0}), limits)
    with pytest.raises(ValidationError, match="limit is 50"):
        validate_stream(StreamConfig(prompt="p" * 51, width=64, height=64), limits)
