"""Gateway hand-over for WebRTC (issue 29): a server told to stop ends each WebRTC session after
``shutdown_grace_s``, telling its ``control`` channel first — ``{"type":"closing","code":1012}``,
the WebSocket's close code in words — so that the publisher publishes again elsewhere."""

from __future__ import annotations

import asyncio
import time

import httpx
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app, hand_over
from ditstream.server.settings import Settings
from test_webrtc import SIZE, TIMEOUT, Publisher, _image

from ditstream.bench.harness import ServerThread

GRACE_S = 0.3


def test_hand_over_tells_webrtc_sessions_on_control():
    settings = Settings(model="null", default_width=SIZE, default_height=SIZE, shutdown_grace_s=GRACE_S)
    with ServerThread(create_app(settings, null_runner())) as srv:
        state = srv.app.state.ditstream

        async def main() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
                pub = Publisher(_image(1))
                r = await pub.publish(client)
                assert r.status_code == 201, r.text
                await pub.reply("ready")
                session = state.webrtc[pub.session]
                t0 = time.monotonic()
                handing = asyncio.run_coroutine_threadsafe(hand_over(state), session.loop)
                closing = await asyncio.wait_for(pub.reply("closing"), 5)  # fails: TimeoutError
                waited = time.monotonic() - t0
                await asyncio.wrap_future(handing)
                assert closing == {"type": "closing", "code": 1012, "reason": "server restarting"}
                assert waited >= GRACE_S
                assert (await client.get("/ready")).status_code == 503
                assert pub.session not in state.webrtc and not state.sessions
                await pub.pc.close()

        asyncio.run(main())
