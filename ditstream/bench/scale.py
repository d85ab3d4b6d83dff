"""``ditstream bench scale``: REST throughput through one gateway with 1 worker, then N, same load.

Everything is real and on loopback: a private ``redis-server`` (unless ``--redis``), the gateway
app under uvicorn, workers as separate processes (each pinned to ``threads`` torch threads, the CPU
stand-in for "one GPU each"). The second run adds workers to the first one's, warms the new ones
up, then sends the same number of requests at the same concurrency. The figure is the ratio of
images per second, measured back to back in one run, so machine speed cancels out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ScaleBenchSpec:
    model: str = "demo"
    workers: int = 2
    jobs: int = 40
    concurrency: int = 8
    size: str | None = None
    steps: int = 1
    threads: int = 1
    max_jobs: int = 2
    backend: str = "torch"
    device: str = "auto"
    null_delay_ms: float = 50.0
    warmup_per_worker: int = 3
    start_timeout_s: float = 600.0


async def _load(url: str, spec: ScaleBenchSpec, n: int, seed0: int) -> dict[str, Any]:
    """``n`` txt2img requests, ``concurrency`` at a time; wall time, latencies and failures."""
    import httpx

    sem = asyncio.Semaphore(spec.concurrency)
    latencies: list[float] = []
    errors: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body: dict[str, Any] = {"prompt": f"a lighthouse at dusk, variation {i}", "seed": seed0 + i,
                                "steps": spec.steps}
        if spec.size:
            body["size"] = spec.size
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/images/generations", json=body)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                return
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                return
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*[one(client, i) for i in range(n)])
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"images": len(lat), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 3), "images_per_s": round(len(lat) / wall, 3) if wall > 0 else 0.0,
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
            }


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _workers_cpu_s(procs: list[Any]) -> float | None:
    vals = [_cpu_s(p.proc.pid) for p in procs if p.proc is not None]
    return None if not vals or any(v is None for v in vals) else sum(v for v in vals if v is not None)


def run_scale_bench(spec: ScaleBenchSpec, redis_url: str | None = None, log_dir: Path | None = None
                    ) -> dict[str, Any]:
    """Run 1 worker, then ``spec.workers``; returns per-run figures and ``speedup``."""
    import httpx

    from ditstream.bench.harness import ServerThread
    from ditstream.bench.scale_harness import RedisServer, WorkerProcess, wait_for
    from ditstream.server.api.app import create_app
    from ditstream.server.scale.gateway import RedisGatewayRunner
    from ditstream.server.settings import Settings

    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="ditstream-bench-scale-"))
    results: dict[str, Any] = {"runs": {}, "log_dir": str(log_dir)}
    procs: list[WorkerProcess] = []
    with contextlib.ExitStack() as stack:
        if redis_url is None:
            redis_url = stack.enter_context(RedisServer(log_dir=log_dir)).url
        settings = Settings(redis_url=redis_url, model=spec.model, job_timeout_s=600.0, worker_heartbeat_s=0.5,
                            worker_ttl_s=5.0, max_queued_jobs=max(16, 2 * spec.concurrency),
                            redis_prefix=f"bench{int(time.time())}")
        gateway = RedisGatewayRunner.from_settings(settings)
        srv = stack.enter_context(ServerThread(create_app(settings, gateway)))
        stack.callback(lambda: [p.stop() for p in procs])
        for n in sorted({1, spec.workers}):
            while len(procs) < n:
                i = len(procs)
                args = ["--model", spec.model, "--backend", spec.backend, "--device", spec.device,
                        "--threads", str(spec.threads), "--max-jobs", str(spec.max_jobs), "--prefix",
                        settings.redis_prefix, "--heartbeat-s", "0.5", "--ttl-s", "5"]
                if spec.model == "null":
                    args += ["--null-delay-ms", str(spec.null_delay_ms)]
                procs.append(WorkerProcess(redis_url, *args, worker_id=f"bench-w{i}",
                                           log=log_dir / f"worker{i}.log").start())
            try:
                wait_for(lambda n=n: gateway.workers_up >= n, spec.start_timeout_s, 0.2, what=f"{n} worker(s)")
            except TimeoutError:
                tails = "\n".join(p.log_tail(1500) for p in procs)
                raise RuntimeError(f"workers did not come up:\n{tails}") from None
            wait_for(lambda: httpx.get(srv.url + "/ready").status_code == 200, 60, what="gateway ready")
            asyncio.run(_load(srv.url, spec, spec.warmup_per_worker * n, seed0=10_000))
            w0, g0 = _workers_cpu_s(procs), time.process_time()
            run = asyncio.run(_load(srv.url, spec, spec.jobs, seed0=0))
            w1, g1 = _workers_cpu_s(procs), time.process_time()
            run["workers"] = n
            # CPU per image: if it stays flat from 1 to N workers, what limits the speed-up is free cores.
            if w0 is not None and w1 is not None and run["images"]:
                run["worker_cpu_ms_per_image"] = round((w1 - w0) * 1e3 / run["images"], 2)
            if run["images"]:
                run["gateway_and_client_cpu_ms_per_image"] = round((g1 - g0) * 1e3 / run["images"], 2)
            results["runs"][str(n)] = run
            logger.info("%d worker(s): %.2f images/s", n, run["images_per_s"])
    one, many = results["runs"].get("1"), results["runs"].get(str(spec.workers))
    if one and many and one["images_per_s"]:
        results["speedup"] = round(many["images_per_s"] / one["images_per_s"], 3)
    return results


def format_report(spec: ScaleBenchSpec, results: dict[str, Any]) -> str:
    lines = [f"bench scale: model {spec.model!r}, {spec.jobs} REST images per run, concurrency {spec.concurrency}, "
             f"{spec.threads} torch thread(s) and {spec.max_jobs} job(s) in flight per worker",
             f"{'workers':>8} {'images/s':>9} {'p50 s':>7} {'p99 s':>7} {'errors':>7} {'worker CPU ms/img':>18} "
             f"{'gateway+client CPU ms/img':>26}"]
    for n, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        wcpu, gcpu = run.get("worker_cpu_ms_per_image"), run.get("gateway_and_client_cpu_ms_per_image")
        lines.append(f"{n:>8} {run['images_per_s']:>9.2f} {run['latency_p50_s'] or 0:>7.3f} "
                     f"{run['latency_p99_s'] or 0:>7.3f} {run['errors']:>7} "
                     f"{'-' if wcpu is None else f'{wcpu:.1f}':>18} {'-' if gcpu is None else f'{gcpu:.1f}':>26}")
    if "speedup" in results:
        lines.append(f"speed-up with {spec.workers} workers over 1: {results['speedup']:.2f}x")
    return "\n".join(lines)
