"""``temporal``, ``temporal_decay`` and ``motion_adaptive`` on the wire: accepted, echoed, refused in band by name."""

from __future__ import annotations

import asyncio
import json

import pytest


@pytest.fixture(scope="module")
def null_server():
    from ditstream.engine.null import null_runner
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings

    from ditstream.bench.harness import ServerThread

    app = create_app(Settings(model="null", default_width=64, default_height=64), null_runner())
    with ServerThread(app) as srv:
        yield srv


BAD = [
    ({"temporal": 1.5}, "temporal", "temporal must be"),
    ({"temporal_decay": 1.0}, "temporal_decay", "temporal_decay must be"),
    ({"motion_adaptive": "yes"}, "motion_adaptive", "motion_adaptive"),
    # the null backend runs no transformer: memory is refused naming the backend, at the config
    ({"temporal": 0.5}, "temporal", "null backend cannot carry attention memory"),
]


def test_websocket_takes_the_fields_and_refuses_bad_ones_in_band(null_server) -> None:
    import websockets
    from testkit import recv_json

    async def main():
        async with websockets.connect(null_server.ws_url, max_size=None) as ws:
            ready = await recv_json(ws)
            assert ready["type"] == "ready"
            assert (ready["config"]["temporal"], ready["config"]["motion_adaptive"]) == (0.0, False)
            for changes, field, text in BAD:
                await ws.send(json.dumps({"type": "config", **changes}))
                err = await recv_json(ws)
                assert (err["type"], err.get("code"), err.get("field")) == ("error", "validation_error", field), err
                assert text in err["message"], err
                await ws.send(json.dumps({"type": "ping", "ts": 1}))
                assert (await recv_json(ws))["type"] == "pong"
            await ws.send(json.dumps({"type": "config", "temporal": 0, "temporal_decay": 0.8,
                                      "motion_adaptive": True, "feedback": 0.5}))
            applied = (await recv_json(ws))["applied"]
            assert (applied["temporal"], applied["temporal_decay"], applied["motion_adaptive"]) == (0, 0.8, True)

    asyncio.run(main())
