"""``ditstream bench gateway``: one live stream through the Redis gateway vs the all-in-one server, side by side.

One run starts everything on loopback: a private ``redis-server``, one null worker (``ditstream
worker --model null``), a gateway (``ditstream serve --redis``) and an all-in-one server (``ditstream
serve --model null``), the two engines with the same simulated inference time. It then drives the
same WebSocket stream (``bench server``'s client: a moving 512² JPEG pattern, open loop at ``fps``
by default) against each, in rounds whose arm order alternates (gateway first, then all-in-one
first, ...) so load that drifts on a shared machine hits both arms alike.

What it reports, per arm: glass-to-glass p50/p90/p99 (medians over rounds), output fps, dropped %,
and the CPU time per answered frame of every process on the frames' path (from ``/proc``: user +
system over the measured window, summed over rounds, ÷ frames answered) — the gateway, the worker
and Redis for the gateway arm, the server for the all-in-one arm. The figure of merit is the
*difference* gateway − all-in-one of the per-round p50 (median over rounds), and the gateway's own
CPU per frame; ``BOUNDS`` are the targets of issue 17 (docs/benchmarks.md records the runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditstream.bench.server import BenchSpec, measure, null_server

logger = logging.getLogger(__name__)

GATEWAY, ALL_IN_ONE = "gateway", "all-in-one"
#: Issue 17's bounds: extra p50 through the gateway, and the gateway's CPU per frame (ms).
BOUNDS = {"extra_p50_ms": 3.0, "gateway_cpu_ms_per_frame": 2.0}


@dataclass
class GatewayBenchSpec:
    fps: float = 30.0
    #: Measured seconds per arm per round (each arm also gets ``warmup_s`` unmeasured before).
    seconds: float = 10.0
    rounds: int = 3
    width: int = 512
    height: int = 512
    quality: int = 85
    #: Simulated inference per engine tick, the same on the worker and the all-in-one server.
    null_delay_ms: float = 0.0
    #: 0: open loop at ``fps`` (a camera); N ≥ 1: closed loop, N frames unanswered at any time.
    inflight: int = 0
    warmup_s: float = 1.0
    #: Seconds with no stream before the rounds, to measure each process's background CPU (its
    #: supervisor, heartbeats, loop-lag monitor): part of every per-frame figure, whatever the fps.
    idle_s: float = 3.0
    start_timeout_s: float = 60.0

    def stream_spec(self) -> BenchSpec:
        """The one-stream ``bench server`` load both arms get."""
        return BenchSpec(streams=1, fps=self.fps, seconds=self.seconds, width=self.width, height=self.height,
                         quality=self.quality, warmup_s=self.warmup_s, inflight=self.inflight,
                         null_delay_ms=self.null_delay_ms)


def arm_order(round_index: int) -> tuple[str, str]:
    """Gateway first in even rounds, all-in-one first in odd ones: a drift over the run cancels out."""
    return (GATEWAY, ALL_IN_ONE) if round_index % 2 == 0 else (ALL_IN_ONE, GATEWAY)


def _median(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # NaN (a round with no answer) is left out
    return round(float(np.median(vals)), 3) if vals else float("nan")


def summarise(runs: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    """Per-arm figures over all rounds, the paired differences, and the verdict against ``BOUNDS``.

    Latency: medians over rounds of each round's percentile. Difference: median over rounds of
    (gateway − all-in-one) p50 of the same round, so a round run under heavier load compares like
    with like. CPU per frame: CPU seconds summed over rounds ÷ frames answered over rounds (one
    round's delta is only a few /proc clock ticks).
    """
    arms: dict[str, Any] = {}
    for name, rs in runs.items():
        received, sent = sum(r["received"] for r in rs), sum(r["sent"] for r in rs)
        cpu: dict[str, float] = {}
        for r in rs:
            for proc, s in r.get("cpu_s", {}).items():
                cpu[proc] = cpu.get(proc, 0.0) + s
        arms[name] = {
            "rounds": len(rs),
            "g2g_ms_p50": _median([r["g2g_ms_p50"] for r in rs]),
            "g2g_ms_p90": _median([r["g2g_ms_p90"] for r in rs]),
            "g2g_ms_p99": _median([r["g2g_ms_p99"] for r in rs]),
            "fps": round(received / (seconds * len(rs)), 2) if rs and seconds else float("nan"),
            "sent": sent, "received": received,
            "dropped_pct": round(100.0 * (sent - received) / sent, 2) if sent else float("nan"),
            "cpu_ms_per_frame": {p: round(s * 1e3 / received, 3) if received else float("nan")
                                 for p, s in cpu.items()},
            "errors": [e for r in rs for e in r.get("errors", [])][:5],
        }
    out: dict[str, Any] = {"arms": arms}
    gw, aio = runs.get(GATEWAY, []), runs.get(ALL_IN_ONE, [])
    if gw and aio:
        pairs = list(zip(gw, aio, strict=False))
        out["extra_ms_p50"] = _median([g["g2g_ms_p50"] - a["g2g_ms_p50"] for g, a in pairs])
        out["extra_ms_p90"] = _median([g["g2g_ms_p90"] - a["g2g_ms_p90"] for g, a in pairs])
        out["extra_ms_p50_per_round"] = [round(g["g2g_ms_p50"] - a["g2g_ms_p50"], 3) for g, a in pairs]
        gcpu = arms[GATEWAY]["cpu_ms_per_frame"].get("server", float("nan"))
        out["gateway_cpu_ms_per_frame"] = gcpu
        out["within_bounds"] = {
            "extra_p50_ms": out["extra_ms_p50"] <= BOUNDS["extra_p50_ms"],
            "gateway_cpu_ms_per_frame": gcpu <= BOUNDS["gateway_cpu_ms_per_frame"],
        }
    return out


def _loadavg() -> str | None:
    """The 1/5/15-minute load averages (Linux): how shared the cores were while the figures were taken."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return None


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU milliseconds per second each process spends with no stream, over ``seconds`` (a window, not a wait)."""
    import time

    from ditstream.bench.server_report import cpu_seconds

    if seconds <= 0:
        return {}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    return {name: round((b - a) * 1e3 / seconds, 2) for name in pids
            if (a := before[name]) is not None and (b := after[name]) is not None}


def run_gateway_bench(spec: GatewayBenchSpec, log_dir: Path | None = None) -> dict[str, Any]:
    """Start Redis, a null worker, a gateway and an all-in-one server; run the rounds; summarise."""
    from ditstream.bench.harness import serve_subprocess
    from ditstream.bench.scale_harness import RedisServer, WorkerProcess

    logging.getLogger("httpx").setLevel(logging.WARNING)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="ditstream-bench-gateway-"))
    stream = spec.stream_spec()
    runs: dict[str, list[dict[str, Any]]] = {GATEWAY: [], ALL_IN_ONE: []}
    load_before = _loadavg()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(log_dir=log_dir))
        worker = WorkerProcess(redis.url, "--model", "null", "--null-delay-ms", str(spec.null_delay_ms),
                               "--heartbeat-s", "0.5", "--ttl-s", "5", worker_id="bench-gateway-w0",
                               log=log_dir / "worker.log").start()
        stack.callback(worker.stop)
        # The gateway is ready once the worker beats (its /ready needs a live worker): no sleep needed.
        gw_args = ["--redis", redis.url, "--max-streams", "2", "--width", str(spec.width), "--height",
                   str(spec.height), "--log-level", "warning"]
        try:
            gw_port, gw_pid = stack.enter_context(
                serve_subprocess(gw_args, {"DITSTREAM_API_KEYS": ""}, spec.start_timeout_s))
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nworker log:\n{worker.log_tail(2000)}") from None
        aio_url, aio_pid = stack.enter_context(null_server(stream, spec.start_timeout_s))
        assert worker.proc is not None and redis.proc is not None
        pids = {f"{GATEWAY} server": gw_pid, "worker": worker.proc.pid, "redis": redis.proc.pid,
                f"{ALL_IN_ONE} server": aio_pid}
        idle = idle_cpu(pids, spec.idle_s)
        targets = {
            GATEWAY: (f"ws://127.0.0.1:{gw_port}", gw_pid, {"worker": worker.proc.pid, "redis": redis.proc.pid}),
            ALL_IN_ONE: (aio_url, aio_pid, {}),
        }
        for i in range(spec.rounds):
            for arm in arm_order(i):
                url, pid, others = targets[arm]
                r = asyncio.run(measure(url, stream, pid=pid, other_pids=others))
                r["round"] = i
                runs[arm].append(r)
                logger.info("round %d %s: g2g p50 %.2f ms, %d/%d frames", i, arm, r["g2g_ms_p50"],
                            r["received"], r["sent"])
    return {"spec": asdict(spec), "runs": runs, "summary": summarise(runs, spec.seconds),
            "idle_cpu_ms_per_s": idle,
            "loadavg_before": load_before, "loadavg_after": _loadavg(), "log_dir": str(log_dir)}


def _ms(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:.2f}"


def format_report(spec: GatewayBenchSpec, results: dict[str, Any]) -> str:
    """The two arms side by side, the difference and the verdict against ``BOUNDS``."""
    s = results["summary"]
    arms = s["arms"]
    load = f"{spec.inflight} in flight (closed loop)" if spec.inflight else f"{spec.fps:g} fps (open loop)"
    lines = [f"bench gateway: 1 stream, {spec.width}x{spec.height} JPEG q{spec.quality} at {load}, "
             f"{spec.rounds} round(s) × {spec.seconds:g} s per arm, null engine {spec.null_delay_ms:g} ms per tick",
             f"load average before / after: {results.get('loadavg_before')} / {results.get('loadavg_after')}", "",
             f"{'':44}{GATEWAY:>12}{ALL_IN_ONE:>12}"]
    names = [GATEWAY, ALL_IN_ONE]

    def row(label: str, fn: Any) -> None:
        lines.append(f"{label:44}" + "".join(f"{fn(arms[n]) if n in arms else '-':>12}" for n in names))

    row("glass-to-glass p50 ms", lambda a: _ms(a["g2g_ms_p50"]))
    row("glass-to-glass p90 ms", lambda a: _ms(a["g2g_ms_p90"]))
    row("glass-to-glass p99 ms", lambda a: _ms(a["g2g_ms_p99"]))
    row("output fps", lambda a: f"{a['fps']:.1f}")
    row("dropped %", lambda a: f"{a['dropped_pct']:.1f}")
    procs = sorted({p for a in arms.values() for p in a["cpu_ms_per_frame"]}, key=lambda p: (p != "server", p))
    for p in procs:
        label = "server (gateway / all-in-one)" if p == "server" else p
        row(f"CPU ms/frame: {label}", lambda a, p=p: _ms(a["cpu_ms_per_frame"].get(p)))
    row("CPU ms/frame: all processes", lambda a: _ms(sum(a["cpu_ms_per_frame"].values())))
    if "extra_ms_p50" in s:
        ok = s["within_bounds"]
        lines += ["",
                  f"gateway − all-in-one, p50: {s['extra_ms_p50']:+.2f} ms (per round: "
                  f"{', '.join(f'{d:+.2f}' for d in s['extra_ms_p50_per_round'])}); p90: {s['extra_ms_p90']:+.2f} ms",
                  f"extra p50 ≤ {BOUNDS['extra_p50_ms']:g} ms: {'met' if ok['extra_p50_ms'] else 'NOT met'}; "
                  f"gateway CPU {_ms(s['gateway_cpu_ms_per_frame'])} ms/frame ≤ "
                  f"{BOUNDS['gateway_cpu_ms_per_frame']:g}: {'met' if ok['gateway_cpu_ms_per_frame'] else 'NOT met'}"]
    idle = results.get("idle_cpu_ms_per_s")
    if idle:
        lines.append(f"with no stream (background, in every per-frame figure): "
                     f"{', '.join(f'{p} {v:.1f}' for p, v in idle.items())} ms CPU per s")
    for n in names:
        if n in arms and arms[n]["errors"]:
            lines.append(f"{n}: errors: {arms[n]['errors']}")
    return "\n".join(lines)
