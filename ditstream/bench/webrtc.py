"""``ditstream bench server --transport webrtc|both``: the WebSocket bench's load over WHIP/WHEP.

Every stream is a WHIP publisher sending the bench's clip (``server.pattern_images``) as a VP8 track
at ``fps``, each frame stamped with its send number (``marks``), and a WHEP viewer reading the numbers
back off the decoded output (the luma plane: no colour conversion on the client). Glass-to-glass is
"the frame handed to the publisher's encoder" → "its number decoded at the viewer", one clock;
dropped % counts the numbers sent within the window that never came back. The server's CPU per
frame is read from ``/proc`` as for the WebSocket path, so the two are compared on one clip, one
server, one machine (``run_transports``: both transports against fresh null servers, interleaved).
Needs the ``webrtc`` extra (aiortc), on the bench's side as on the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from fractions import Fraction
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np

from ditstream.bench import marks
from ditstream.bench.server import (
    BenchSpec,
    _client_lag,
    _Stream,
    _summarise,
    measure,
    null_server,
    pattern_images,
)
from ditstream.bench.server_report import batch_histogram, cpu_seconds, scrape_metrics

CLOCK = 90_000


def clip_track(images: list[np.ndarray], fps: float) -> Any:
    """A video track (aiortc) playing ``images`` in a loop at ``fps``, each stamped with its number.

    Until ``start()`` every frame is number 0 (a viewer can wait for it to know the path is up);
    from then on 1, 2, …; ``sent[n]`` is when frame ``n`` went to the encoder (``perf_counter``).
    ``limit``: after that number, the last frame is repeated (a finite clip).
    """
    import av
    from aiortc.mediastreams import MediaStreamTrack

    class ClipTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.sent: dict[int, float] = {}
            self.limit: int | None = None
            self._n = 0
            self._next_t: float | None = None
            self._t0 = time.perf_counter()

        def start(self, limit: int | None = None) -> None:
            self.limit, self._n = limit, 1

        async def recv(self) -> av.VideoFrame:
            now = time.perf_counter()
            self._next_t = now if self._next_t is None else max(self._next_t + 1.0 / fps, now - 1.0)
            await asyncio.sleep(max(0.0, self._next_t - now))
            n = self._n
            if self._n and (self.limit is None or self._n < self.limit):
                self._n += 1
            image = marks.stamp(images[n % len(images)].copy(), n)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = int((time.perf_counter() - self._t0) * CLOCK), Fraction(1, CLOCK)
            self.sent.setdefault(n, time.perf_counter())
            return frame

    return ClipTrack()


class ClipViewer:
    """A WHEP viewer recording (frame number, arrival time) of every decoded frame that reads."""

    def __init__(self) -> None:
        from aiortc import RTCPeerConnection

        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.got: list[tuple[int, float]] = []
        self.first = asyncio.Event()
        self.pc.on("track", self._on_track)
        self._tasks: list[asyncio.Task] = []

    def _on_track(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                now = time.perf_counter()
                luma = frame.to_ndarray() if frame.format.name == "yuv420p" else frame.to_ndarray(format="gray")
                n = marks.read(luma[: frame.height])
                if n is not None:
                    self.got.append((n, now))
                    self.first.set()

        self._tasks.append(asyncio.ensure_future(read()))


async def negotiate(client: httpx.AsyncClient, pc: Any, url: str) -> httpx.Response:
    """POST ``pc``'s offer (WHIP or WHEP) and apply the answer; the response, whatever its status."""
    from aiortc import RTCSessionDescription

    from ditstream.server.live.webrtc_jitter import use_frame_end_marker

    await pc.setLocalDescription(await pc.createOffer())
    r = await client.post(url, content=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"})
    if r.status_code == 201:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        use_frame_end_marker(pc)  # a viewer completes frames at their last packet, as browsers do
    return r


class ClipSession:
    """One publisher of the clip and one viewer of its output (``async with``)."""

    def __init__(self, client: httpx.AsyncClient, images: list[np.ndarray], fps: float, query: str = "") -> None:
        from aiortc import RTCPeerConnection

        self.client, self.query = client, query
        self.pub = RTCPeerConnection()
        self.track = clip_track(images, fps)
        self.pub.addTrack(self.track)
        self.viewer = ClipViewer()
        self.location = ""

    async def __aenter__(self) -> ClipSession:
        r = await negotiate(self.client, self.pub, "/v1/whip" + self.query)
        if r.status_code != 201:
            raise RuntimeError(f"WHIP refused: {r.status_code} {r.text}")
        self.location = r.headers["location"]
        r = await negotiate(self.client, self.viewer.pc, "/v1/whep/" + self.location.rsplit("/", 1)[1])
        if r.status_code != 201:
            raise RuntimeError(f"WHEP refused: {r.status_code} {r.text}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.client.delete(self.location)
        for pc in (self.viewer.pc, self.pub):
            await pc.close()

    def tally(self, t_start: float, t_end: float) -> _Stream:
        """What was sent within [t_start, t_end) and what of it came back (first arrivals)."""
        st = _Stream()
        window = {n: t for n, t in self.track.sent.items() if n and t_start <= t < t_end}
        seen: set[int] = set()
        for n, at in self.viewer.got:
            if n in window and n not in seen:
                seen.add(n)
                st.latency_ms.append((at - window[n]) * 1e3)
        st.sent, st.received = len(window), len(seen)
        return st


async def measure_webrtc(http_url: str, spec: BenchSpec, pid: int | None = None,
                         connect_timeout: float = 30.0) -> dict[str, Any]:
    """One run of ``spec`` over WHIP/WHEP; the same keys as ``server.measure``'s."""
    images = await asyncio.to_thread(pattern_images, spec.width, spec.height, 30)
    query = "?" + urlencode({"size": f"{spec.width}x{spec.height}", "prompt": spec.prompt})
    async with httpx.AsyncClient(base_url=http_url, timeout=connect_timeout) as client, \
            contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(ClipSession(client, images, spec.fps, f"{query}&seed={i}"))
                    for i in range(spec.streams)]
        await asyncio.wait_for(asyncio.gather(*[s.viewer.first.wait() for s in sessions]), connect_timeout)
        before = await asyncio.to_thread(scrape_metrics, http_url, None)
        client_lag: list[float] = []
        stop = asyncio.Event()
        lag_task = asyncio.create_task(_client_lag(stop, client_lag))
        for s in sessions:
            s.track.start()
        await asyncio.sleep(spec.warmup_s)
        t_start, cpu0 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.sleep(spec.seconds)
        t_end, cpu1 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.sleep(1.0)  # the last frames' way back
        stop.set()
        await lag_task
        after = await asyncio.to_thread(scrape_metrics, http_url, None)
        streams = [s.tally(t_start, t_end) for s in sessions]
    out = _summarise(spec, streams, before["lag"], after["lag"], client_lag)
    out["batch_sizes"] = batch_histogram(before["batch"], after["batch"])
    if cpu0 is not None and cpu1 is not None and out["received"]:
        out["server_cpu_ms_per_frame"] = round((cpu1 - cpu0) * 1e3 / out["received"], 3)
    return out


def run_transports(spec: BenchSpec, transports: list[str], repeats: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Each transport against a fresh null server, interleaved ``repeats`` times (as ``run_arms``)."""
    for name in ("httpx", "aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in transports}
    for _ in range(repeats):
        for t in transports:
            with null_server(spec) as (ws_url, pid):
                if t == "webrtc":
                    result = asyncio.run(measure_webrtc(ws_url.replace("ws://", "http://"), spec, pid=pid))
                else:
                    result = asyncio.run(measure(ws_url, spec, pid=pid))
            runs[t].append(result)
    return runs


def format_transports(spec: BenchSpec, runs: dict[str, list[dict[str, Any]]]) -> str:
    """The transports' median runs side by side, then WebRTC / WebSocket ratios (medians of per-repeat ratios)."""
    from ditstream.bench.server_report import format_report, median_run, paired_ratio

    names = {"ws": "WebSocket (JPEG)", "webrtc": "WebRTC (VP8)"}
    merged = {names[t]: median_run(r) for t, r in runs.items()}
    repeats = len(next(iter(runs.values()), []))
    lines = [format_report(spec, merged), "", f"null engine {spec.null_delay_ms:g} ms per call; medians of "
             f"{repeats} interleaved repeat(s), one fresh server per run"]
    if "ws" in runs and "webrtc" in runs:
        lines.append(f"  WebRTC / WebSocket: glass-to-glass p50 ×{paired_ratio(runs, 'webrtc', 'ws', 'g2g_ms_p50'):.2f}, "
                     f"server CPU per frame ×{paired_ratio(runs, 'webrtc', 'ws', 'server_cpu_ms_per_frame'):.2f}")
    return "\n".join(lines)
