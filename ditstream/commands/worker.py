"""``ditstream worker``: an engine that serves REST jobs and pinned streams from Redis (scale-out; see
docs/deploy.md), with ``/health`` and ``/metrics`` on ``--health-port``.

Only typer is imported at module level; the engine, Redis and uvicorn load inside the command. The
start-up it shares with ``serve`` is ``_startup``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

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
)
from ditstream.commands._startup import EngineArgs, load_engine_or_exit, settings_for

if TYPE_CHECKING:
    from ditstream.commands._worker_http import HealthServer
    from ditstream.server.scale.worker import Worker

log = logging.getLogger("ditstream.server.scale.worker")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("worker")(worker)


def worker(
    redis: str = typer.Option(None, "--redis", help="Redis URL, e.g. redis://redis:6379/0, or "
                       "redis+sentinel://HOST:PORT,HOST:PORT/MASTER/DB, DB optional (env DITSTREAM_REDIS_URL)."),
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
    stream_capacity: int = typer.Option(None, help="Live streams this worker is sized for: the autoscaling signal "
                                        "counts it full at this many (env DITSTREAM_WORKER_STREAM_CAPACITY; not a limit)."),
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
    engine = EngineArgs(model=model, backend=backend, device=device, dtype=dtype, resolution=resolution,
                        batch=batch, cache_dir=cache_dir, tiny_vae=tiny_vae, opt_level=opt_level, lora=lora,
                        max_batch=max_batch, null_delay_ms=null_delay_ms, threads=threads)
    settings = settings_for(
        "ditstream worker", engine, log, redis_url=redis, worker_max_jobs=max_jobs,
        worker_stream_capacity=stream_capacity, worker_heartbeat_s=heartbeat_s,
        worker_ttl_s=ttl_s, job_claim_idle_s=claim_idle_s, job_max_attempts=max_attempts, redis_prefix=prefix,
        frame_codec=frame_codec)
    if not settings.redis_url:
        typer.echo("ditstream worker: no Redis URL (--redis or DITSTREAM_REDIS_URL)", err=True)
        raise typer.Exit(2)
    from ditstream.server.scale.config import ScaleConfig
    from ditstream.server.scale.worker import Worker

    # the worker's own engine is in process: the Redis URL is where it takes work from, not a gateway
    runner = load_engine_or_exit("ditstream worker", settings.model_copy(update={"redis_url": None}))
    w = Worker(runner, ScaleConfig.from_settings(settings), worker_id=worker_id)
    _leave_on_signals(w)
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


def _leave_on_signals(w: Worker) -> None:
    """SIGTERM/SIGINT: leave gracefully (answer the jobs held first), as an orchestrator expects."""
    import signal

    def _leave(signum: int, _frame: object) -> None:
        log.info("worker %s: signal %d, leaving (answering the jobs it holds first)", w.id, signum)
        w.request_stop()

    signal.signal(signal.SIGTERM, _leave)
    signal.signal(signal.SIGINT, _leave)


def _health_server(w: Worker, port: int) -> HealthServer:
    """``/health`` and ``/metrics`` for one worker on ``port`` (all interfaces), serving on return."""
    from ditstream.commands._worker_http import HealthServer

    return HealthServer(w, port)
