"""``ditstream bench load`` and ``ditstream bench soak``: overload behaviour and leaks, measured.

**Load** is open-loop, as real traffic is: REST requests arrive at a Poisson rate whether or not
earlier ones finished, and K WebSocket streams send frames at F fps whether or not outputs came back.
A closed-loop client (send, wait, send) slows down with the server and hides overload. Reported per
run: throughput, p50/p99 latency of admitted work (REST: request → 200; streams: frame sent → its
output), and rejections (REST 429, streams refused with 1013), plus anything else (which must be 0).

**Capacity** of a null-engine server (started here when no ``--url`` is given) follows from its settings: every
engine tick takes ``delay`` and serves every queued item, so an admitted image is answered within two
ticks and at most ``max_queued_jobs`` are admitted at once: REST capacity is
``max_queued_jobs / (2·delay)`` images/s (what the admission limit sustains in the worst case);
stream capacity is ``max_streams``. ``--levels 0.5,1.5`` runs the same mix at those multiples and
reports the p99 of admitted work at the highest level over its p99 at the lowest (the bound is 2×).

**Soak** runs N WebSocket connect/exchange/disconnect cycles and M REST requests against a fresh
null-engine server and reports its resident memory before (after a warm-up) and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ditstream.bench.harness import serve_subprocess

logger = logging.getLogger(__name__)

WS_TRY_AGAIN_LATER = 1013


# ------------------------------------------------------------------------------------ null server
#: How a null server is run: ``engine`` is ``ditstream serve --model null`` (the engine in process);
#: ``gateway`` is ``ditstream serve --redis URL`` in front of one ``ditstream worker --model null``
#: on a private ``redis-server`` — the same app, its engine reached through Redis.
MODES = ("engine", "gateway")


@dataclass(frozen=True)
class NullServerConfig:
    """A null-engine server: the engine costs a fixed ``delay_ms`` per tick; ``mode`` is one of ``MODES``."""

    delay_ms: float = 100.0
    max_streams: int = 4
    max_queued_jobs: int = 4
    width: int = 64
    height: int = 64
    extra_env: tuple[tuple[str, str], ...] = ()
    mode: str = "engine"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    @property
    def rest_capacity(self) -> float:
        """Images/s the admission limit lets through (see the module docstring)."""
        return self.max_queued_jobs / (2.0 * self.delay_ms / 1e3)


@contextlib.contextmanager
def null_server(cfg: NullServerConfig, timeout: float = 120.0) -> Iterator[tuple[str, int]]:
    """Start the server on a free loopback port; yields (http:// base URL, pid of the process serving
    HTTP — the gateway in gateway mode, so the memory measured is its own). Stopped on exit."""
    args = ["--max-streams", str(cfg.max_streams), "--max-queued-jobs", str(cfg.max_queued_jobs),
            "--width", str(cfg.width), "--height", str(cfg.height), "--log-level", "warning"]
    env = {"DITSTREAM_API_KEYS": "", **dict(cfg.extra_env)}
    with contextlib.ExitStack() as stack:
        if cfg.mode == "gateway":
            args += ["--redis", stack.enter_context(_null_worker(cfg, env, timeout))]
        else:
            args += ["--model", "null", "--null-delay-ms", str(cfg.delay_ms)]
        port, pid = stack.enter_context(serve_subprocess(args, env, timeout))
        base = f"http://127.0.0.1:{port}"
        served = httpx.get(base + "/ready", timeout=10).json().get("mode")
        if served != cfg.mode:  # a figure measured on the wrong kind of server would be a lie
            raise RuntimeError(f"asked for a {cfg.mode} server, /ready says mode {served!r}")
        yield base, pid


@contextlib.contextmanager
def _null_worker(cfg: NullServerConfig, env: dict[str, str], timeout: float) -> Iterator[str]:
    """A private ``redis-server`` and one ``ditstream worker --model null`` on it; yields the Redis URL.

    The worker takes the same environment (frame, pixel and prompt limits apply on both sides) and
    holds ``max_queued_jobs`` REST jobs at once, so the gateway's admission limit, not the worker,
    decides what is refused. The gateway's ``/ready`` turns 200 only once it sees this worker beat.
    A worker that exits early fails with the tail of its log.
    """
    from ditstream.bench.scale_harness import RedisServer, WorkerProcess

    with tempfile.TemporaryDirectory(prefix="ditstream-null-gateway-") as tmp, \
            RedisServer(log_dir=Path(tmp)) as redis:
        worker = WorkerProcess(redis.url, "--model", "null", "--null-delay-ms", str(cfg.delay_ms),
                               "--max-jobs", str(cfg.max_queued_jobs), "--threads", "1",
                               worker_id="null-worker", log=Path(tmp) / "worker.log", env=env).start()
        try:
            yield redis.url
        except RuntimeError as exc:  # the gateway never became ready: say what the worker said
            raise RuntimeError(f"{exc}; worker log:\n{worker.log_tail(2000)}") from exc
        finally:
            worker.stop()


def rss_bytes(pid: int) -> int:
    """Resident memory of a local process (Linux /proc; psutil elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


# ------------------------------------------------------------------------------------ load
@dataclass
class LoadSpec:
    """One open-loop run."""

    rate: float = 10.0  # REST requests per second (Poisson); 0 = none
    streams: int = 2  # WebSocket streams opened at the start
    fps: float = 10.0  # input frames per second per stream
    seconds: float = 10.0
    width: int = 64
    height: int = 64
    seed: int = 0
    api_key: str | None = None
    drain_s: float = 5.0  # after the last arrival, how long answers may still come


@dataclass
class LoadResult:
    spec: dict[str, Any]
    rest_sent: int = 0
    rest_ok: int = 0
    rest_429: int = 0
    rest_other: dict[str, int] = field(default_factory=dict)
    rest_ms: list[float] = field(default_factory=list)
    streams_admitted: int = 0
    streams_refused_1013: int = 0
    streams_other: list[str] = field(default_factory=list)
    frames_sent: int = 0
    frames_answered: int = 0
    frame_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        s = self.spec["seconds"]
        return {
            "rest_rate": self.spec["rate"], "streams_asked": self.spec["streams"], "fps": self.spec["fps"],
            "seconds": s,
            "rest_sent": self.rest_sent, "rest_ok": self.rest_ok, "rest_429": self.rest_429,
            "rest_other": dict(self.rest_other),
            "rest_throughput": round(self.rest_ok / s, 2),
            "rest_ms_p50": _pct(self.rest_ms, 50), "rest_ms_p99": _pct(self.rest_ms, 99),
            "streams_admitted": self.streams_admitted, "streams_refused_1013": self.streams_refused_1013,
            "streams_other": list(self.streams_other),
            "frames_sent": self.frames_sent, "frames_answered": self.frames_answered,
            "frame_throughput": round(self.frames_answered / s, 2),
            "frame_ms_p50": _pct(self.frame_ms, 50), "frame_ms_p99": _pct(self.frame_ms, 99),
            "admitted_ms_p99": _pct(self.rest_ms + self.frame_ms, 99),
            "unclean": sum(self.rest_other.values()) + len(self.streams_other),
        }


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


def _frame_bytes(width: int, height: int) -> bytes:
    from ditstream.clients.stream_client import encode_jpeg

    img = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_jpeg(img, quality=80)


def _pack(seq: int, ts: float, image: bytes) -> bytes:
    head = json.dumps({"seq": seq, "ts": ts}, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + image


async def run_load(base_url: str, spec: LoadSpec) -> LoadResult:
    """One open-loop run of ``spec`` against the server at ``base_url`` (http://host:port)."""
    result = LoadResult(spec=asdict(spec) | {"api_key": None})
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    frame = await asyncio.to_thread(_frame_bytes, spec.width, spec.height)
    t0 = time.perf_counter() + 0.5
    t_end = t0 + spec.seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=spec.seconds + spec.drain_s + 30) as client:
        tasks = [asyncio.create_task(_rest_arrivals(client, spec, result, t0, t_end))]
        ws_url = base_url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
        tasks += [asyncio.create_task(_stream(ws_url, headers, spec, frame, result, t0, t_end, i))
                  for i in range(spec.streams)]
        await asyncio.gather(*tasks)
    return result


async def _rest_arrivals(client: httpx.AsyncClient, spec: LoadSpec, result: LoadResult, t0: float,
                         t_end: float) -> None:
    if spec.rate <= 0:
        return
    rng = random.Random(spec.seed)
    body = {"prompt": "load", "size": f"{spec.width}x{spec.height}", "n": 1, "output_format": "jpeg"}
    inflight: set[asyncio.Task] = set()
    t = t0
    while True:
        t += rng.expovariate(spec.rate)
        if t >= t_end:
            break
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        task = asyncio.create_task(_one_request(client, body, result))  # open loop: never awaited here
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.wait(inflight, timeout=spec.drain_s + 30)


async def _one_request(client: httpx.AsyncClient, body: dict[str, Any], result: LoadResult) -> None:
    result.rest_sent += 1
    start = time.perf_counter()
    try:
        r = await client.post("/v1/images/generations", json={**body, "seed": result.rest_sent})
        code = str(r.status_code)
    except httpx.HTTPError as exc:
        code = type(exc).__name__
    if code == "200":
        result.rest_ok += 1
        result.rest_ms.append((time.perf_counter() - start) * 1e3)
    elif code == "429":
        result.rest_429 += 1
    else:
        result.rest_other[code] = result.rest_other.get(code, 0) + 1


async def _stream(url: str, headers: dict[str, str], spec: LoadSpec, frame: bytes, result: LoadResult,
                  t0: float, t_end: float, index: int) -> None:
    import websockets

    try:
        async with websockets.connect(url, additional_headers=headers, max_size=None, compression=None,
                                      open_timeout=30) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if first.get("type") != "ready":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.wait_closed(), 5)
                if ws.close_code == WS_TRY_AGAIN_LATER and first.get("code") == "overloaded":
                    result.streams_refused_1013 += 1
                else:
                    result.streams_other.append(f"{first.get('code')}/{ws.close_code}")
                return
            result.streams_admitted += 1
            sent_at: dict[int, float] = {}

            async def receive() -> None:
                async for msg in ws:
                    if isinstance(msg, bytes):
                        (n,) = struct.unpack_from(">I", msg)
                        seq = json.loads(msg[4 : 4 + n])["seq"]
                        t = sent_at.pop(seq, None)
                        if t is not None:
                            result.frames_answered += 1
                            result.frame_ms.append((time.perf_counter() - t) * 1e3)

            reader = asyncio.create_task(receive())
            period = 1.0 / spec.fps
            next_t = t0 + period * index / max(1, spec.streams)
            seq = 0
            while next_t < t_end:
                await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
                sent_at[seq] = time.perf_counter()
                await ws.send(_pack(seq, time.time() * 1e3, frame))
                result.frames_sent += 1
                seq += 1
                next_t += period
            await asyncio.sleep(min(spec.drain_s, 1.0))
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
    except Exception as exc:  # a refused handshake, a reset: counted as unclean, never hidden
        result.streams_other.append(type(exc).__name__)


def run_levels(cfg: NullServerConfig, levels: list[float], seconds: float, fps: float,
               url: str | None = None) -> dict[str, Any]:
    """The same mix at ``levels`` × capacity, each against a fresh null server (or ``url``)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runs: dict[str, Any] = {}
    for level in levels:
        spec = LoadSpec(rate=round(level * cfg.rest_capacity, 2), streams=max(1, round(level * cfg.max_streams)),
                        fps=fps, seconds=seconds, width=cfg.width, height=cfg.height)
        if url:
            res = asyncio.run(run_load(url, spec))
        else:
            with null_server(cfg) as (base, _pid):
                res = asyncio.run(run_load(base, spec))
        runs[f"{level:g}x"] = res.summary()
    lo, hi = runs[f"{min(levels):g}x"], runs[f"{max(levels):g}x"]
    ratio = hi["admitted_ms_p99"] / lo["admitted_ms_p99"] if lo["admitted_ms_p99"] else float("nan")
    return {"config": asdict(cfg) | {"rest_capacity": round(cfg.rest_capacity, 2)}, "runs": runs,
            "p99_ratio": round(ratio, 3)}


def format_levels(report: dict[str, Any]) -> str:
    cfg, runs = report["config"], report["runs"]
    rows = [
        ("REST offered rate /s", lambda r: f"{r['rest_rate']:g}"),
        ("REST sent / 200 / 429 / other", lambda r: f"{r['rest_sent']} / {r['rest_ok']} / {r['rest_429']} / "
                                                    f"{sum(r['rest_other'].values())}"),
        ("REST throughput /s", lambda r: f"{r['rest_throughput']:.1f}"),
        ("REST p50 / p99 ms", lambda r: f"{r['rest_ms_p50']:.1f} / {r['rest_ms_p99']:.1f}"),
        ("streams asked / admitted / 1013", lambda r: f"{r['streams_asked']} / {r['streams_admitted']} / "
                                                      f"{r['streams_refused_1013']}"),
        ("frames sent / answered", lambda r: f"{r['frames_sent']} / {r['frames_answered']}"),
        ("frame p50 / p99 ms", lambda r: f"{r['frame_ms_p50']:.1f} / {r['frame_ms_p99']:.1f}"),
        ("admitted work p99 ms", lambda r: f"{r['admitted_ms_p99']:.1f}"),
        ("unclean answers", lambda r: f"{r['unclean']}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    via = " behind a gateway (Redis)" if cfg.get("mode") == "gateway" else ""
    lines = [f"ditstream bench load: null engine{via} {cfg['delay_ms']:g} ms/tick, max_streams {cfg['max_streams']}, "
             f"max_queued_jobs {cfg['max_queued_jobs']} → capacity {cfg['rest_capacity']:g} images/s + "
             f"{cfg['max_streams']} streams", "", "".ljust(width) + "".join(k.rjust(22) for k in runs)]
    lines += [label.ljust(width) + "".join(fn(r).rjust(22) for r in runs.values()) for label, fn in rows]
    lines += ["", f"p99 of admitted work, highest level / lowest level: {report['p99_ratio']:.2f} (bound: 2)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ soak
async def _soak_cycles(base_url: str, cycles: int, requests: int, width: int, height: int,
                       headers: dict[str, str]) -> dict[str, int]:
    """``cycles`` WS connect → config → one frame → answer → close, and ``requests`` REST images."""
    import websockets

    ws_url = base_url.replace("http://", "ws://") + "/v1/stream"
    frame = await asyncio.to_thread(_frame_bytes, width, height)
    counts = {"ws_ok": 0, "ws_bad": 0, "rest_ok": 0, "rest_bad": 0}
    for i in range(cycles):
        try:
            async with websockets.connect(ws_url, additional_headers=headers, max_size=None,
                                          compression=None) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
                await ws.send(json.dumps({"type": "config", "prompt": f"p{i % 50}", "seed": i}))
                await ws.send(_pack(i, 0.0, frame))
                while not isinstance(await asyncio.wait_for(ws.recv(), 30), bytes):
                    pass
            counts["ws_ok"] += 1
        except Exception:
            logger.debug("soak cycle %d failed", i, exc_info=True)
            counts["ws_bad"] += 1
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        for i in range(requests):
            r = await client.post("/v1/images/generations", json={"prompt": f"p{i % 50}", "seed": i,
                                                                   "size": f"{width}x{height}"})
            counts["rest_ok" if r.status_code == 200 else "rest_bad"] += 1
    return counts


def soak(base_url: str, pid: int, cycles: int, requests: int, width: int = 64, height: int = 64,
         warmup: int = 50, api_key: str | None = None) -> dict[str, Any]:
    """RSS after ``warmup`` cycles and requests, then after the full soak; growth in %."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    asyncio.run(_soak_cycles(base_url, warmup, warmup, width, height, headers))
    time.sleep(0.5)
    before = rss_bytes(pid)
    t = time.perf_counter()
    counts = asyncio.run(_soak_cycles(base_url, cycles, requests, width, height, headers))
    elapsed = time.perf_counter() - t
    time.sleep(0.5)
    after = rss_bytes(pid)
    return {"cycles": cycles, "requests": requests, **counts, "rss_before_mb": round(before / 2**20, 2),
            "rss_after_mb": round(after / 2**20, 2), "rss_growth_pct": round(100.0 * (after - before) / before, 2),
            "seconds": round(elapsed, 1)}
