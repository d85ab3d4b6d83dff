"""``ditstream worker`` and ``ditstream bench scale`` (scale-out over Redis; see docs/deploy.md).

Only typer is imported at module level; the engine, Redis and uvicorn load inside the commands.
"""

from __future__ import annotations

import typer

from ditstream.commands._args import (
    BackendName,
    Batches,
    CacheDir,
    Device,
    Dtype,
    Loras,
    Model,
    NullDelayMs,
    OptLevel,
    Resolutions,
    Threads,
    TinyVae,
    backend_overrides,
    lora_specs,
    settings_or_exit,
    size_arg,
)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("worker")(worker)
    bench.command("scale")(bench_scale)
    bench.command("gateway")(bench_gateway)


def worker(
    redis: str = typer.Option(None, "--redis", help="Redis URL, e.g. redis://redis:6379/0 (env DITSTREAM_REDIS_URL)."),
    model: Model = None,
    backend: BackendName = None,
    device: Device = None,
    dtype: Dtype = None,
    resolution: Resolutions = None,
    batch: Batches = None,
    cache_dir: CacheDir = None,
    tiny_vae: TinyVae = None,
    opt_level: OptLevel = None,
    lora: Loras = None,
    max_batch: int = typer.Option(None, help="Largest batched model call."),
    max_jobs: int = typer.Option(None, help="REST jobs this worker holds at once (env DITSTREAM_WORKER_MAX_JOBS)."),
    worker_id: str = typer.Option(None, help="Stable name (default host-pid-random)."),
    heartbeat_s: float = typer.Option(None, help="Seconds between heartbeats."),
    ttl_s: float = typer.Option(None, help="A worker silent this long is dead (sessions move, jobs are claimed)."),
    claim_idle_s: float = typer.Option(None, help="Idle seconds after which a pending job is claimed."),
    max_attempts: int = typer.Option(None, help="Deliveries before a job goes to the dead-letter stream."),
    prefix: str = typer.Option(None, help="Redis key prefix (several deployments can share one Redis)."),
    frame_codec: str = typer.Option(None, help="Stream frames on the wire: jpeg | raw | png."),
    null_delay_ms: NullDelayMs = None,
    threads: Threads = None,
    health_port: int = typer.Option(None, "--health-port", help="Serve /health and /metrics on this port "
                                    "(0 = off; env DITSTREAM_WORKER_HEALTH_PORT)."),
) -> None:
    """Run an engine that serves REST jobs and pinned streams from Redis (gateway: `serve --redis`)."""
    import logging
    import signal

    backend_args = backend_overrides(resolution, batch, cache_dir, tiny_vae, opt_level)
    if lora:
        lora_specs(lora)  # a malformed --lora is a usage error before anything loads
        backend_args["loras"] = list(lora)
    overrides = {k: v for k, v in dict(
        redis_url=redis, model=model, backend=backend, device=device, dtype=dtype, max_batch=max_batch,
        worker_max_jobs=max_jobs, worker_heartbeat_s=heartbeat_s, worker_ttl_s=ttl_s, job_claim_idle_s=claim_idle_s,
        job_max_attempts=max_attempts, redis_prefix=prefix, frame_codec=frame_codec,
        null_delay_s=null_delay_ms / 1e3 if null_delay_ms is not None else None, threads=threads).items()
        if v is not None}
    settings = settings_or_exit("ditstream worker", {**overrides, **backend_args})
    if not settings.redis_url:
        typer.echo("ditstream worker: no Redis URL (--redis or DITSTREAM_REDIS_URL)", err=True)
        raise typer.Exit(2)
    log = logging.getLogger("ditstream.server.scale.worker")
    log.info("settings: %s", settings.public())
    from ditstream.engine.threads import set_torch_threads

    set_torch_threads(settings.threads)
    from ditstream.engine.errors import DitstreamError
    from ditstream.server.api.factory import load_runner
    from ditstream.server.scale.config import ScaleConfig
    from ditstream.server.scale.worker import Worker

    try:
        runner = load_runner(settings.model_copy(update={"redis_url": None}))
    except DitstreamError as exc:
        typer.echo(f"ditstream worker: cannot load model {settings.model!r}: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    w = Worker(runner, ScaleConfig.from_settings(settings), worker_id=worker_id)

    def _leave(signum: int, _frame: object) -> None:
        log.info("worker %s: signal %d, leaving (answering the jobs it holds first)", w.id, signum)
        w.request_stop()

    signal.signal(signal.SIGTERM, _leave)
    signal.signal(signal.SIGINT, _leave)
    w.start()
    port = health_port if health_port is not None else settings.worker_health_port
    server = _health_server(w, port) if port else None
    typer.echo(f"ditstream worker {w.id}: model {runner.info.get('model')!r} on {runner.info.get('device')}, "
               f"Redis {settings.public()['redis_url']}")
    while not w.wait(0.5):
        pass
    if server is not None:
        server.shutdown()
    w.stop()
    if w.error is not None:
        typer.echo(f"ditstream worker {w.id}: stopped on error: {w.error!r}", err=True)
        raise typer.Exit(1)


def _health_server(w: object, port: int):  # -> http.server.ThreadingHTTPServer
    """``/health`` (200 once the engine is warm and runs, 503 "warming" before, else 503 "down") and
    ``/metrics`` for one worker."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ditstream.server.scale.worker import Worker

    assert isinstance(w, Worker)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                lines = [f'ditstream_worker_{k}{{worker="{w.id}"}} {v}' for k, v in sorted(w.counters.items())]
                body, code, ctype = ("\n".join(lines) + "\n").encode(), 200, "text/plain; version=0.0.4"
            else:
                ok, health = w.health()
                body = json.dumps(health).encode()
                code, ctype = (200 if ok else 503), "application/json"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:  # no access log per probe
            return

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="ditstream-worker-health", daemon=True).start()
    return server


def bench_scale(
    model: str = typer.Option("demo", help="Model the workers load ('demo', a folder, or 'null')."),
    workers: int = typer.Option(2, "--workers", "-w", help="Workers of the scaled run (compared with 1)."),
    jobs: int = typer.Option(40, "--jobs", "-n", help="REST images per run."),
    concurrency: int = typer.Option(8, "--concurrency", "-c", help="Requests in flight at once."),
    size: str = typer.Option(None, help="Image size WxH (default: the model's own)."),
    steps: int = typer.Option(1, help="Model calls per image."),
    threads: int = typer.Option(1, help="torch threads per worker (1 = one core each, like one GPU each)."),
    max_jobs: int = typer.Option(2, help="Jobs each worker holds at once."),
    backend: str = typer.Option("torch", help="Worker backend."),
    device: str = typer.Option("auto", help="Worker device."),
    null_delay_ms: float = typer.Option(50.0, help="Null model only: simulated inference time per tick."),
    redis: str = typer.Option(None, "--redis", help="Use this Redis (default: start a private redis-server)."),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
) -> None:
    """REST throughput through the gateway with 1 worker, then with N, on the same load (ratio reported)."""
    import json

    from ditstream.bench.scale import ScaleBenchSpec, format_report, run_scale_bench

    spec = ScaleBenchSpec(model=model, workers=workers, jobs=jobs, concurrency=concurrency, size=size, steps=steps,
                          threads=threads, max_jobs=max_jobs, backend=backend, device=device,
                          null_delay_ms=null_delay_ms)
    results = run_scale_bench(spec, redis_url=redis)
    typer.echo(format_report(spec, results))
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"spec": spec.__dict__, "results": results}, f, indent=2)


def bench_gateway(
    fps: float = typer.Option(30.0, help="Input frames per second (open loop, as a camera sends)."),
    inflight: int = typer.Option(0, "--inflight", min=0, help="Closed loop instead: keep N frames unanswered."),
    seconds: float = typer.Option(10.0, "--seconds", "-t", help="Measured seconds per arm per round."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds; the arm order alternates between rounds."),
    size: str = typer.Option("512x512", help="Frame size WxH."),
    null_delay_ms: float = typer.Option(0.0, "--null-delay-ms", help="Simulated inference per tick (both arms)."),
    idle_s: float = typer.Option(3.0, "--idle-s", help="Seconds with no stream first: each process's background "
                                 "CPU (0: skip)."),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
) -> None:
    """One live stream through the Redis gateway vs the all-in-one server, side by side in one run."""
    import json

    from ditstream.bench.gateway import GatewayBenchSpec, format_report, run_gateway_bench

    width, height = size_arg(size) or (512, 512)
    spec = GatewayBenchSpec(fps=fps, inflight=inflight, seconds=seconds, rounds=rounds, width=width, height=height,
                            null_delay_ms=null_delay_ms, idle_s=idle_s)
    results = run_gateway_bench(spec)
    typer.echo(format_report(spec, results))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=2)
