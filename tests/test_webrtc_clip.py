"""Issue 20's acceptance over real processes: a 512×512, 30 fps clip published over WHIP to ``ditstream
serve --model null`` (a subprocess) comes back over WHEP, ≥ 90 % of its frames, in order.

Every frame carries its number drawn as blocks (``ditstream.bench.marks``), read back off the decoded
VP8 output; the bench's WebRTC transport (``bench server --transport webrtc``) uses the same client.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

from ditstream.bench import marks
from ditstream.bench.server import BenchSpec, null_server, pattern_images
from ditstream.bench.webrtc import ClipSession

FPS, SECONDS, SIZE = 30, 3, 512


def test_marks_read_back_exactly_or_not_at_all():
    image = pattern_images(SIZE, SIZE, 1)[0]
    for n in (0, 1, 90, 0xBEEF, 0xFFFF):
        assert marks.read(marks.stamp(image.copy(), n)) == n
    noisy = marks.stamp(image.copy(), 1234).astype(np.int16) + np.random.default_rng(0).integers(-40, 40, image.shape)
    assert marks.read(np.clip(noisy, 0, 255).astype(np.uint8)) == 1234
    assert marks.read(image) is None  # an unstamped frame reads as nothing
    assert marks.read(np.full((SIZE, SIZE), 128, np.uint8)) is None


def test_a_512_clip_at_30_fps_comes_back_through_whep_in_order():
    frames = FPS * SECONDS

    async def main(url: str) -> list[int]:
        images = pattern_images(SIZE, SIZE, 30)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client, \
                ClipSession(client, images, FPS, f"?size={SIZE}x{SIZE}") as s:
            await asyncio.wait_for(s.viewer.first.wait(), 30)  # frame 0 made the round trip: the path is up
            s.track.start(limit=frames)
            deadline = time.monotonic() + SECONDS + 15
            while not any(n == frames for n, _ in s.viewer.got):
                assert time.monotonic() < deadline, f"the clip's last frame never came back: {s.viewer.got[-5:]}"
                await asyncio.sleep(0.05)
            return [n for n, _ in s.viewer.got if n]

    with null_server(BenchSpec(streams=1, width=SIZE, height=SIZE)) as (ws_url, _pid):
        got = asyncio.run(main(ws_url.replace("ws://", "http://")))
    assert got == sorted(got), "frames came back out of order"
    assert set(got) <= set(range(1, frames + 1))
    assert len(set(got)) >= 0.9 * frames, f"{len(set(got))} of {frames} frames came back"


def test_bench_server_compares_the_transports_side_by_side(tmp_path):
    """``bench server --transport both``: one table, WebRTC / WebSocket ratios (figures not asserted)."""
    import json

    from typer.testing import CliRunner

    from ditstream.cli import app

    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "server", "--transport", "both", "-n", "1", "-t", "1.5", "--size",
                                 "128x128", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "WebRTC (VP8)" in r.output and "WebSocket (JPEG)" in r.output
    assert "WebRTC / WebSocket: glass-to-glass p50 ×" in r.output
    runs = json.loads(out.read_text())["runs"]
    for t in ("ws", "webrtc"):
        (run,) = runs[t]
        assert run["errors"] == [] and 0 < run["received"] <= run["sent"] and run["g2g_ms_p50"] > 0, run
