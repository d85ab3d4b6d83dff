"""The stream client's reconnect (issue 29) against a scripted server: on 1012 it opens a new stream
with the same config and goes on with the next seq; it gives up after ``Reconnect.attempts`` tries
(refusals with ``overloaded``/1013 counted); a close it must not resume is raised."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from ditstream.clients.media import open_source
from ditstream.clients.stream_client import Reconnect, pack_frame, run_stream, unpack_frame
from websockets.asyncio.server import serve

FAST = Reconnect(attempts=3, first_delay_s=0.01, max_delay_s=0.05)


class Script:
    """Connection n gets ``plans[n]``: ``("serve", k, code)`` answers k frames then closes with code;
    ``("refuse",)`` answers ``overloaded`` and closes 1013."""

    def __init__(self, *plans: tuple[Any, ...]) -> None:
        self.plans = list(plans)
        self.opened = 0
        self.configs: list[dict[str, Any]] = []
        self.seqs: list[list[int]] = []

    async def handler(self, ws: Any) -> None:
        plan = self.plans[min(self.opened, len(self.plans) - 1)]
        self.opened += 1
        if plan[0] == "refuse":
            await ws.send(json.dumps({"type": "error", "code": "overloaded", "message": "full"}))
            await ws.close(1013, "overloaded")
            return
        _, k, code = plan
        await ws.send(json.dumps({"type": "ready", "session": f"s{self.opened}"}))
        self.configs.append(json.loads(await ws.recv()))
        seqs: list[int] = []
        self.seqs.append(seqs)
        async for msg in ws:
            header, _ = unpack_frame(msg)
            seqs.append(header["seq"])
            await ws.send(pack_frame({"seq": header["seq"], "ts": header["ts"]}, b"jpeg"))
            if len(seqs) == k:
                await ws.close(code, "scripted")
                return


async def _run(script: Script, **kw: Any):
    async with serve(script.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        got: list[int] = []
        stats = await run_stream(f"ws://127.0.0.1:{port}", open_source("pattern", 32, 32), config={"prompt": "x"},
                                 fps=200, on_output=lambda h, _: got.append(h["seq"]), reconnect=FAST, **kw)
        return stats, got


def test_resumes_after_1012_with_same_config_and_next_seq():
    script = Script(("serve", 5, 1012), ("refuse",), ("serve", 10**6, 1000))
    stats, got = asyncio.run(_run(script, max_frames=12))
    assert stats.close_codes == [1012] and stats.reconnects == 1
    assert script.opened == 3  # the refusal in between counted as one try
    assert script.configs == [{"type": "config", "prompt": "x"}] * 2
    assert script.seqs[1][0] == script.seqs[0][-1] + 1, script.seqs
    assert got == sorted(set(got)) and len(got) == 12


def test_gives_up_after_the_attempts():
    script = Script(("serve", 3, 1012), ("refuse",))
    with pytest.raises(ConnectionError, match="3 reconnects failed"):
        asyncio.run(_run(script, max_frames=50))
    assert script.opened == 1 + FAST.attempts


def test_other_close_codes_are_not_resumed():
    script = Script(("serve", 3, 1011), ("serve", 10**6, 1000))
    with pytest.raises(websockets.ConnectionClosedError, match="1011"):
        asyncio.run(_run(script, max_frames=50))
    assert script.opened == 1
