"""WebRTC with the demo model (issue 20): the WHEP output follows the prompt, and a config change
through ``POST /v1/sessions/{id}/config`` shows within 3 frames of the viewer's video.

The publisher sends a red circle on white; the prompt asks for a blue (then a green) one. The
demo's model-independent evaluator (``engine/demo/evaluator.py``) reads the colour off the decoded
VP8 frames. In-process app through real uvicorn on loopback (the demo engine shares the module's
loaded components), an aiortc client.
"""

from __future__ import annotations

import asyncio
import time

import aiortc
import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import read_image
from rtckit import Source

from ditstream.bench.harness import ServerThread
from ditstream.bench.webrtc import negotiate

TIMEOUT = 60.0
BLUE, GREEN = ds.caption_for("circle", "blue", "white"), ds.caption_for("circle", "green", "white")


@pytest.fixture(scope="module")
def demo_server():
    from ditstream.engine.backends import create_backend
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.core import EngineCore
    from ditstream.engine.loader import load_components
    from ditstream.engine.prompt_cache import PromptCache
    from ditstream.engine.runner import EngineRunner
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings

    components = load_components(ModelConfig(model="demo", device="cpu", dtype="fp32"))
    backend = create_backend("torch", components)
    runner = EngineRunner(EngineCore(components, backend, PromptCache(components)))
    runner.info = {"model": "demo", "backend": backend.name, "device": "cpu", "dtype": "float32",
                   "size_multiple": runner.core.size_multiple, "defaults": components.defaults}
    with ServerThread(create_app(Settings(model="demo"), runner)) as srv:
        yield srv


def test_whep_output_follows_the_prompt_and_a_config_change_shows_within_3_frames(demo_server):
    red = ds.render(ds.ShapeSpec("circle", "red", "white", 32.0, 32.0, 16.0))
    assert read_image(red).colour == "red"

    async def main() -> tuple[int, list[str]]:
        async with httpx.AsyncClient(base_url=demo_server.url, timeout=TIMEOUT) as client:
            pub, view = RTCPeerConnection(), RTCPeerConnection()
            pub.addTrack(Source(red))
            view.addTransceiver("video", direction="recvonly")
            frames: asyncio.Queue[np.ndarray] = asyncio.Queue()
            readers: list[asyncio.Task] = []

            def on_track(track) -> None:
                async def read() -> None:
                    while True:
                        try:
                            frames.put_nowait((await track.recv()).to_ndarray(format="rgb24"))
                        except aiortc.mediastreams.MediaStreamError:
                            return
                readers.append(asyncio.ensure_future(read()))

            view.on("track", on_track)
            r = await negotiate(client, pub, "/v1/whip?" + str(httpx.QueryParams({"prompt": BLUE})))
            assert r.status_code == 201, r.text
            session = r.headers["location"].rsplit("/", 1)[1]
            assert (await negotiate(client, view, f"/v1/whep/{session}")).status_code == 201
            deadline = time.monotonic() + TIMEOUT
            while read_image(await asyncio.wait_for(frames.get(), TIMEOUT)).colour != "blue":
                assert time.monotonic() < deadline, "the output never took the prompt's colour"
            r = await client.post(f"/v1/sessions/{session}/config", json={"prompt": GREEN})
            assert r.status_code == 200 and r.json()["applied"]["prompt"] == GREEN, r.text
            while not frames.empty():  # decoded before the reply: not counted
                frames.get_nowait()
            seen = []
            while not seen or seen[-1] != "green":
                seen.append(read_image(await asyncio.wait_for(frames.get(), TIMEOUT)).colour)
                assert len(seen) <= 10, seen
            await client.delete(f"/v1/whip/{session}")
            for pc in (pub, view):
                await pc.close()
            return len(seen), seen

    n, seen = asyncio.run(main())
    print(f"the new prompt showed in frame {n} after the config reply: {seen}")
    assert n <= 3, seen
