"""Live-streams bench: N camera-like streams at a fixed fps through one ``ditstream serve``, per N.

The number users see: for each stream count N (default 1, 4, 8, 16) every stream sends frames at
``fps`` (open loop, as a camera does, answered or not) over a WebSocket for ``seconds``, and the bench
reports the aggregate output fps, glass-to-glass latency p50/p99 (frame sent → its output received,
on the bench's one clock), how many frames came back, and whether each stream's outputs came back in
``seq`` order (the protocol promises it). One server serves every level, started once (``serve
--device D --backend B --model M`` in a subprocess, ``harness.serve_subprocess``), so a compile
backend's warm-up is paid once, before the first level's warm-up second. The JSON is rewritten after
every level, so a run stopped by its time limit still leaves the levels it measured.

    python -m ditstream.bench.live_streams --device cuda --backend compile --out live-streams.json

``scripts/gpu-check`` runs it on the lent GPU; on a CPU it runs the same way (``--device cpu``; the
test drives N = 1, 2 for a second against the demo model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditstream.bench.harness import serve_subprocess
from ditstream.bench.server import pattern_images
from ditstream.bench.server_report import percentile

DEFAULT_LEVELS = (1, 4, 8, 16)


@dataclass
class LiveSpec:
    """One run: the server it starts and the load at each level."""

    levels: tuple[int, ...] = DEFAULT_LEVELS
    fps: float = 30.0
    seconds: float = 5.0
    warmup_s: float = 1.0
    device: str = "cuda"
    backend: str = "compile"
    model: str = "demo"
    prompt: str = "a watercolor painting"
    #: Seconds to wait for the server's /ready (model load, compile warm-up).
    ready_timeout_s: float = 240.0
    server_args: list[str] = field(default_factory=list)


@dataclass
class _Stream:
    """What one stream saw after its warm-up: output seqs in arrival order and their latencies."""

    sent: int = 0
    seqs: list[int] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _pack(seq: int, ts: float, image: bytes) -> bytes:
    """The protocol's binary frame: 4-byte header length, JSON header, JPEG (docs/protocol.md)."""
    head = json.dumps({"seq": seq, "ts": ts}, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + image


def _header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from(">I", data)
    return json.loads(data[4 : 4 + n])


async def _frames_for(ws: Any, prompt: str, index: int) -> tuple[int, int]:
    """Open the stream (ready → config → its echo); returns the stream's (width, height)."""
    ready = json.loads(await ws.recv())
    if ready.get("type") != "ready":
        raise RuntimeError(f"stream refused: {ready}")
    await ws.send(json.dumps({"type": "config", "prompt": prompt, "seed": index}))
    while True:
        msg = json.loads(await ws.recv())
        if msg.get("type") == "config":
            cfg = msg.get("config", msg)
            return int(cfg.get("width", ready["config"]["width"])), int(cfg.get("height", ready["config"]["height"]))
        if msg.get("type") == "error":
            raise RuntimeError(f"config refused: {msg}")


async def _one_stream(ws_url: str, spec: LiveSpec, streams: int, index: int, t_start: float,
                      t_end: float, frames: dict[tuple[int, int], list[bytes]]) -> _Stream:
    import websockets

    st = _Stream()
    async with websockets.connect(ws_url, max_size=None, compression=None) as ws:
        size = await _frames_for(ws, spec.prompt, index)
        if size not in frames:
            frames[size] = await asyncio.to_thread(_encoded_clip, *size)
        clip = frames[size]
        first_seq: int | None = None

        async def receive() -> None:
            async for msg in ws:
                now = time.perf_counter() * 1e3
                if isinstance(msg, str):
                    st.errors.append(json.loads(msg))
                    continue
                h = _header(msg)
                if first_seq is not None and h["seq"] >= first_seq:  # not a warm-up frame
                    st.seqs.append(h["seq"])
                    st.latency_ms.append(now - h["ts"])

        recv = asyncio.create_task(receive())
        period = 1.0 / spec.fps
        next_t = t_start - spec.warmup_s + period * index / streams  # staggered inside one period
        seq = 0
        while (next_t := next_t + period) < t_end:
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            if first_seq is None and time.perf_counter() >= t_start:
                first_seq = seq
            await ws.send(_pack(seq, time.perf_counter() * 1e3, clip[seq % len(clip)]))
            st.sent += first_seq is not None
            seq += 1
        await asyncio.sleep(min(1.0, 10 * period))  # the last answers
        recv.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recv
    return st


def _encoded_clip(width: int, height: int, n: int = 30) -> list[bytes]:
    from ditstream.server.codec import encode

    return [encode(img, "jpeg", 85) for img in pattern_images(width, height, n)]


async def measure_level(ws_url: str, spec: LiveSpec, streams: int) -> dict[str, Any]:
    """``streams`` streams at ``spec.fps`` for ``spec.seconds``: the level's summary."""
    t_start = time.perf_counter() + spec.warmup_s + 0.5
    t_end = t_start + spec.seconds
    frames: dict[tuple[int, int], list[bytes]] = {}
    got = await asyncio.gather(*[_one_stream(ws_url, spec, streams, i, t_start, t_end, frames)
                                 for i in range(streams)])
    lat = [v for s in got for v in s.latency_ms]
    received = sum(len(s.seqs) for s in got)
    sent = sum(s.sent for s in got)
    return {
        "streams": streams, "fps_in_per_stream": spec.fps, "seconds": spec.seconds,
        "fps_total": round(received / spec.seconds, 2),
        "fps_per_stream": [round(len(s.seqs) / spec.seconds, 2) for s in got],
        "g2g_ms_p50": percentile(lat, 50), "g2g_ms_p99": percentile(lat, 99),
        "sent": sent, "received": received,
        "dropped_pct": round(100.0 * (sent - received) / sent, 2) if sent else None,
        "in_order": all(s.seqs == sorted(s.seqs) and len(set(s.seqs)) == len(s.seqs) for s in got),
        "errors": [e for s in got for e in s.errors][:5],
    }


def run(spec: LiveSpec, out: Path | None = None) -> dict[str, Any]:
    """Start one server, measure every level in turn; the report (also written to ``out`` after each level)."""
    import torch

    report: dict[str, Any] = {"spec": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()},
                              "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if spec.device.startswith("cuda") else None,
                              "levels": []}
    args = ["--model", spec.model, "--device", spec.device, "--backend", spec.backend,
            "--max-streams", str(max(spec.levels)), "--max-fps", str(max(spec.fps, 1.0)),
            "--log-level", "warning", *spec.server_args]
    t0 = time.perf_counter()
    with serve_subprocess(args, {"DITSTREAM_API_KEYS": ""}, spec.ready_timeout_s) as (port, _pid):
        report["server_ready_s"] = round(time.perf_counter() - t0, 2)
        for n in spec.levels:
            report["levels"].append(asyncio.run(measure_level(f"ws://127.0.0.1:{port}/v1/stream", spec, n)))
            if out is not None:
                out.write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditstream.bench.live_streams", description=__doc__.split("\n")[0])
    p.add_argument("--streams", default=",".join(map(str, DEFAULT_LEVELS)), help="stream counts, e.g. 1,4,8,16")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level (after 1 s of warm-up)")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="compile")
    p.add_argument("--model", default="demo")
    p.add_argument("--max-batch", type=int, help="serve --max-batch (bounds the compile backend's CUDA-graph buckets)")
    p.add_argument("--ready-timeout-s", type=float, default=240.0)
    p.add_argument("--out", type=Path, help="write the JSON report here (rewritten after every level)")
    a = p.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    spec = LiveSpec(levels=tuple(int(n) for n in a.streams.split(",")), fps=a.fps, seconds=a.seconds,
                    warmup_s=a.warmup_s, device=a.device, backend=a.backend, model=a.model,
                    ready_timeout_s=a.ready_timeout_s,
                    server_args=["--max-batch", str(a.max_batch)] if a.max_batch else [])
    report = run(spec, a.out)
    for lv in report["levels"]:
        print(f"{lv['streams']:3d} streams: {lv['fps_total']:7.1f} fps total, g2g p50 {lv['g2g_ms_p50']} ms "
              f"p99 {lv['g2g_ms_p99']} ms, in order: {lv['in_order']}")
    return 0 if all(lv["in_order"] and lv["received"] for lv in report["levels"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
