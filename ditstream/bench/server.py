"""``ditstream bench server``: N concurrent WebSocket streams for T seconds, open or closed loop.

Open loop (default): every stream sends at a fixed input fps, as a camera does, answered or not.
Closed loop (``inflight`` ≥ 1): every stream keeps that many frames unanswered and sends the next
one as soon as an answer comes back (outputs come in ``seq`` order, so "unanswered" is
``last sent seq − last answered seq``; a frame dropped by the server is then implied answered).

Measures what a user sees and what the server adds:
* per-stream output fps and their spread (fairness: (max − min) / mean), glass-to-glass latency
  p50/p99 (frame sent → its output received, one clock: the bench's own), dropped % (inputs never
  answered: replaced at the server) and skipped % (similarity filter);
* the batch sizes of the server's model calls over the run (its ``ditstream_batch_size`` histogram);
* server overhead per frame from the output headers: ``server_ms − inference_ms`` (receipt to
  send, minus model time), with decode and encode medians;
* the server's event-loop lag over the run, from its ``/metrics`` (stalls over 20 ms counted from
  the ``ditstream_event_loop_lag_seconds`` histogram), and the bench client's own loop lag (a
  stalled client would inflate latencies, so it is reported too).

The same load is run against a null-engine server started for the purpose (``ditstream serve
--model null`` in a subprocess, ``null_delay_ms`` of simulated inference per tick, counted as
inference), which isolates the server's overhead from the model's. ``run_arms`` runs several
specs against fresh null servers, interleaved ``repeats`` times, for ratios measured side by side.
Frames are a moving pattern (or the JPEGs of ``frames_dir``), JPEG-encoded once up front, so the
client spends no time encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ditstream.bench.harness import serve_subprocess
from ditstream.bench.server_report import (
    batch_histogram,
    cpu_seconds,
    percentile,
    scrape_metrics,
)

logger = logging.getLogger(__name__)

STALL_S = 0.02


@dataclass
class BenchSpec:
    streams: int = 4
    fps: float = 30.0
    seconds: float = 10.0
    width: int = 512
    height: int = 512
    prompt: str = "a watercolor painting"
    quality: int = 85
    #: Chroma subsampling of the input frames: 420 is what browsers and OpenCV send; 444 costs the
    #: server ~0.5 ms more decode per 512² frame.
    subsampling: str = "420"
    warmup_s: float = 1.0
    #: 0: open loop at ``fps``; N ≥ 1: closed loop, N frames unanswered per stream at any time.
    inflight: int = 0
    #: A folder of JPEGs to send instead of the pattern (scaled to ``width``×``height`` if needed).
    frames_dir: str | None = None
    #: Null server only: simulated inference per tick (``serve --null-delay-ms``).
    null_delay_ms: float = 0.0
    #: Null server only: ``DITSTREAM_BATCH_WAIT`` (None: the server's default).
    batch_wait: float | None = None


def _folder_frames(folder: str, width: int, height: int, quality: int, subsampling: str) -> list[bytes]:
    """The ``*.jpg``/``*.jpeg`` of ``folder`` in name order; re-encoded at width×height when sized otherwise."""
    import pathlib

    import simplejpeg
    from PIL import Image

    from ditstream.clients.stream_client import decode_jpeg, encode_jpeg

    paths = sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not paths:
        raise ValueError(f"no .jpg/.jpeg files in {folder}")
    out = []
    for path in paths:
        data = path.read_bytes()
        w, h = simplejpeg.decode_jpeg_header(data)[1::-1]
        if (w, h) != (width, height):
            img = Image.fromarray(decode_jpeg(data)).resize((width, height), Image.BILINEAR)
            data = encode_jpeg(np.asarray(img), quality, subsampling)
        out.append(data)
    return out


def pattern_images(width: int, height: int, n: int) -> list[np.ndarray]:
    """The bench's clip: ``n`` frames of a moving gradient with a white square, uint8 RGB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for t in range(n):
        img = np.stack([(x / width * 255 + t * 8) % 256, (y / height * 255 + t * 4) % 256,
                        np.full_like(x, 128 + 100 * np.sin(t / 5))], -1).astype(np.uint8)
        s = min(width, height) // 5
        cx, cy = int((width - s) * (0.5 + 0.45 * np.sin(t / 4))), int((height - s) * (0.5 + 0.45 * np.cos(t / 3)))
        img[cy : cy + s, cx : cx + s] = 255
        out.append(img)
    return out


def _pattern(width: int, height: int, n: int, quality: int, subsampling: str = "420") -> list[bytes]:
    from ditstream.clients.stream_client import encode_jpeg

    return [encode_jpeg(img, quality, subsampling) for img in pattern_images(width, height, n)]


def _pack(seq: int, ts: float, image: bytes) -> bytes:
    head = json.dumps({"seq": seq, "ts": ts}, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + image


def _unpack_header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from(">I", data)
    return json.loads(data[4 : 4 + n])


class _Stream:
    """One bench stream's tallies, and the last answered seq its closed loop waits on."""

    def __init__(self) -> None:
        self.sent = 0  # in the measured window
        self.sent_total = 0  # warm-up included: every frame the server was given
        self.received = 0
        self.skipped = 0
        self.latency_ms: list[float] = []
        self.overhead_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.encode_ms: list[float] = []
        self.errors: list[dict[str, Any]] = []
        self.stalls = 0  # closed loop: no answer for a second, a frame sent anyway
        self.first_seq: int | None = None  # the first frame sent in the measured window
        self.last_answered = -1
        self.answered = asyncio.Event()

    def on_message(self, msg: str | bytes, now_ms: float) -> None:
        """An error (a frame answered all the same when it names its seq) or an output, counted once
        the measured window has begun."""
        if isinstance(msg, str):
            err = json.loads(msg)
            self.errors.append(err)
            if isinstance(err.get("seq"), int):
                self.last_answered = max(self.last_answered, err["seq"])
                self.answered.set()
            return
        h = _unpack_header(msg)
        self.last_answered = max(self.last_answered, h["seq"])
        self.answered.set()
        if self.first_seq is None or h["seq"] < self.first_seq:
            return  # warm-up frame
        self.received += 1
        self.skipped += bool(h.get("skipped"))
        self.latency_ms.append(now_ms - h["ts"])
        t = h.get("timings", {})
        self.overhead_ms.append(t.get("server_ms", 0.0) - t.get("inference_ms", 0.0))
        self.decode_ms.append(t.get("decode_ms", 0.0))
        self.encode_ms.append(t.get("encode_ms", 0.0))


async def _one_stream(url: str, headers: dict[str, str] | None, spec: BenchSpec, frames: list[bytes],
                      t_start: float, t_end: float, index: int) -> _Stream:
    import websockets

    st = _Stream()
    async with websockets.connect(url, additional_headers=headers, max_size=None, compression=None) as ws:
        await _configure(ws, spec, index)

        async def receive() -> None:
            async for msg in ws:
                st.on_message(msg, time.perf_counter() * 1e3)

        recv = asyncio.create_task(receive())
        await _send_frames(ws, st, spec, frames, t_start, t_end, index)
        await asyncio.sleep(1.0 if spec.inflight else min(1.0, 10 / spec.fps))  # let the last answers arrive
        recv.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await recv
    return st


async def _configure(ws: Any, spec: BenchSpec, index: int) -> None:
    """Wait for ``ready``, send the stream's config (seed = its index) and wait for it to be applied."""
    ready = json.loads(await ws.recv())
    if ready.get("type") != "ready":
        raise RuntimeError(f"stream refused: {ready}")
    await ws.send(json.dumps({"type": "config", "prompt": spec.prompt, "size": f"{spec.width}x{spec.height}",
                              "seed": index}))
    while True:
        msg = json.loads(await ws.recv())
        if msg.get("type") == "config":
            return
        if msg.get("type") == "error":
            raise RuntimeError(f"config refused: {msg}")


async def _send_frames(ws: Any, st: _Stream, spec: BenchSpec, frames: list[bytes], t_start: float, t_end: float,
                       index: int) -> None:
    """Send until ``t_end``: open loop at ``spec.fps``, or closed loop keeping ``spec.inflight`` unanswered.
    Frames from ``t_start`` on are counted (the ones before warm the server up)."""
    period = 1.0 / spec.fps
    # Stagger the streams inside one period so they do not all send at the same instant.
    next_t = t_start - spec.warmup_s + period * index / max(spec.streams, 1)
    seq = 0
    while True:
        if spec.inflight:  # closed loop: send as soon as fewer than `inflight` are unanswered
            if seq == 0:
                await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            await _wait_for_room(st, spec.inflight, seq, t_end)
            if time.perf_counter() >= t_end:
                break
        else:
            next_t += period
            if next_t >= t_end:
                break
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
        if st.first_seq is None and time.perf_counter() >= t_start:
            st.first_seq = seq
        await ws.send(_pack(seq, time.perf_counter() * 1e3, frames[seq % len(frames)]))
        st.sent_total += 1
        if st.first_seq is not None:
            st.sent += 1
        seq += 1


async def _wait_for_room(st: _Stream, inflight: int, seq: int, t_end: float) -> None:
    """Closed loop: wait until fewer than ``inflight`` frames are unanswered; a second without an answer
    counts a stall and sends anyway."""
    while seq - 1 - st.last_answered >= inflight and time.perf_counter() < t_end:
        st.answered.clear()
        try:
            await asyncio.wait_for(st.answered.wait(), min(1.0, max(0.001, t_end - time.perf_counter())))
        except TimeoutError:
            if time.perf_counter() < t_end:
                st.stalls += 1
                return


async def _client_lag(stop: asyncio.Event, out: list[float], interval: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(interval)
        out.append(max(0.0, loop.time() - t0 - interval))


async def measure(url: str, spec: BenchSpec, api_key: str | None = None, pid: int | None = None,
                  other_pids: dict[str, int] | None = None) -> dict[str, Any]:
    """One run of ``spec`` against the server at ``url`` (ws:// or http:// base).

    ``pid``: the server's process id when it runs on this machine, to report its CPU time per frame
    (a load-independent view of the overhead: wall-clock figures grow when the cores are shared).
    ``other_pids``: more local processes on the frames' path (a worker, Redis), by name; with ``pid``
    (as "server") their CPU seconds over the measured window land in ``cpu_s``.
    """
    base = url.rstrip("/").replace("/v1/stream", "")
    http_url = base.replace("ws://", "http://").replace("wss://", "https://")
    ws_url = http_url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    if spec.frames_dir:
        frames = await asyncio.to_thread(_folder_frames, spec.frames_dir, spec.width, spec.height, spec.quality,
                                         spec.subsampling)
    else:
        frames = await asyncio.to_thread(_pattern, spec.width, spec.height, 30, spec.quality, spec.subsampling)
    before = await asyncio.to_thread(scrape_metrics, http_url, headers)
    client_lag: list[float] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(_client_lag(stop, client_lag))
    t_start = time.perf_counter() + spec.warmup_s + 0.5
    t_end = t_start + spec.seconds
    pids = {**({"server": pid} if pid is not None else {}), **(other_pids or {})}
    cpu: list[dict[str, float | None]] = []

    async def mark_cpu(at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        cpu.append({name: cpu_seconds(p) for name, p in pids.items()})

    marks = [asyncio.create_task(mark_cpu(t_start)), asyncio.create_task(mark_cpu(t_end))]
    streams = await asyncio.gather(*[_one_stream(ws_url, headers, spec, frames, t_start, t_end, i)
                                     for i in range(spec.streams)])
    await asyncio.gather(*marks)
    stop.set()
    await lag_task
    after = await asyncio.to_thread(scrape_metrics, http_url, headers)
    out = _summarise(spec, list(streams), before["lag"], after["lag"], client_lag)
    out["batch_sizes"] = batch_histogram(before["batch"], after["batch"])
    # What the server was given over the scrapes (warm-up included; the batch sizes count these) and the
    # clip's JPEG size: the input bandwidth is frame_bytes × fps per stream.
    out["sent_incl_warmup"] = sum(s.sent_total for s in streams)
    out["frame_bytes"] = round(sum(len(f) for f in frames) / len(frames), 1)
    spent = {name: round(b - a, 3) for name in pids
             if (a := cpu[0][name]) is not None and (b := cpu[1][name]) is not None}
    if pids:
        out["cpu_s"] = spent
    if "server" in spent and out["received"]:
        out["server_cpu_ms_per_frame"] = round(spent["server"] * 1e3 / out["received"], 3)
    return out


def _summarise(spec: BenchSpec, streams: list[_Stream], before: dict[float, float], after: dict[float, float],
               client_lag: list[float]) -> dict[str, Any]:
    lat = [v for s in streams for v in s.latency_ms]
    over = [v for s in streams for v in s.overhead_ms]
    sent = sum(s.sent for s in streams)
    received = sum(s.received for s in streams)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    total_ticks = delta.get(float("inf"), 0.0)
    stalls = total_ticks - delta.get(STALL_S, total_ticks)
    nonzero = [k for k in sorted(delta) if delta[k] < total_ticks]  # buckets some sample exceeded
    lag_max_le = min((k for k in sorted(delta) if delta[k] >= total_ticks), default=float("inf"))
    fps = [s.received / spec.seconds for s in streams]
    mean_fps = received / spec.seconds / max(1, spec.streams)
    return {
        "streams": spec.streams, "inflight": spec.inflight,
        "fps_per_stream": [round(f, 2) for f in fps],
        "fps_per_stream_mean": round(mean_fps, 2),
        "fps_total": round(received / spec.seconds, 2),
        "fps_spread_pct": round(100.0 * (max(fps) - min(fps)) / mean_fps, 1) if mean_fps else float("nan"),
        "g2g_ms_p50": percentile(lat, 50), "g2g_ms_p90": percentile(lat, 90), "g2g_ms_p99": percentile(lat, 99),
        "server_overhead_ms_p50": percentile(over, 50), "server_overhead_ms_p99": percentile(over, 99),
        "decode_ms_p50": percentile([v for s in streams for v in s.decode_ms], 50),
        "encode_ms_p50": percentile([v for s in streams for v in s.encode_ms], 50),
        "sent": sent, "received": received,
        "dropped_pct": round(100.0 * (sent - received) / sent, 2) if sent else float("nan"),
        "skipped_pct": round(100.0 * sum(s.skipped for s in streams) / received, 2) if received else float("nan"),
        "server_loop_ticks": int(total_ticks),
        "server_loop_stalls_over_20ms": int(stalls),
        "server_loop_lag_max_ms_le": round(lag_max_le * 1e3, 1) if nonzero or total_ticks else float("nan"),
        "client_loop_lag_ms_max": round(max(client_lag, default=0.0) * 1e3, 2),
        "closed_loop_stalls": sum(s.stalls for s in streams),
        "errors": [e for s in streams for e in s.errors][:5],
    }


# ------------------------------------------------------------------------------ null server
@contextlib.contextmanager
def null_server(spec: BenchSpec, timeout: float = 120.0) -> Iterator[tuple[str, int]]:
    """A ``ditstream serve --model null`` subprocess on a free port; yields (ws:// base URL, pid)."""
    args = ["--model", "null", "--max-streams", str(spec.streams + 1), "--width", str(spec.width),
            "--height", str(spec.height), "--null-delay-ms", str(spec.null_delay_ms), "--log-level", "warning"]
    env = {"DITSTREAM_API_KEYS": ""}
    if spec.batch_wait is not None:
        env["DITSTREAM_BATCH_WAIT"] = str(spec.batch_wait)
    with serve_subprocess(args, env, timeout) as (port, pid):
        yield f"ws://127.0.0.1:{port}", pid


def run_bench(spec: BenchSpec, url: str | None = None, api_key: str | None = None,
              null: bool = True) -> dict[str, dict[str, Any]]:
    """Run ``spec`` against ``url`` and/or a fresh null-engine server."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    if url:
        results["server"] = asyncio.run(measure(url, spec, api_key))
    if null:
        with null_server(spec) as (null_url, pid):
            results["null engine"] = asyncio.run(measure(null_url, spec, pid=pid))
    return results


def run_arms(arms: dict[str, BenchSpec], repeats: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Each arm against its own fresh null server, interleaved: arm 1, arm 2, …, then again ``repeats`` times.

    Load that comes and goes on a shared machine then hits every arm alike; compare arms with
    ``paired_ratio`` (the median of the per-repeat ratios).
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, spec in arms.items():
            with null_server(spec) as (null_url, pid):
                runs[name].append(asyncio.run(measure(null_url, spec, pid=pid)))
    return runs
