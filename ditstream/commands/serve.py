"""``ditstream serve`` and ``ditstream bench server``.

Only typer is imported at module level (``ditstream --help`` stays fast); FastAPI, uvicorn and the
engine are imported inside the commands.
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
    app.command("serve")(serve)
    bench.command("server")(bench_server)


def serve(
    host: str = typer.Option(None, help="Interface to listen on (env DITSTREAM_HOST, default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (env DITSTREAM_PORT, default 8000)."),
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
    max_streams: int = typer.Option(None, help="Live WebSocket streams at once (more are refused with 1013)."),
    max_batch: int = typer.Option(None, help="Largest batched model call (env DITSTREAM_MAX_BATCH, default 16); "
                                  "never above what the backend takes (its profile's largest batch)."),
    max_queued_jobs: int = typer.Option(None, help="REST images queued at once (more get 429 + Retry-After)."),
    api_key: list[str] = typer.Option(None, "--api-key", help="Accept this API key (repeatable). "
                                      "Better: DITSTREAM_API_KEYS=k1,k2 (keeps keys out of `ps`)."),
    cors_origin: list[str] = typer.Option(None, "--cors-origin", help="Let pages from this origin call the API "
                                          "(repeatable; '*' = any; env DITSTREAM_CORS_ORIGINS). Default: no CORS."),
    max_frame_bytes: int = typer.Option(None, help="Largest WebSocket frame in bytes."),
    max_upload_bytes: int = typer.Option(None, help="Largest REST upload in bytes."),
    max_pixels: int = typer.Option(None, help="Largest image area in pixels."),
    max_prompt_chars: int = typer.Option(None, help="Longest prompt in characters."),
    max_fps: float = typer.Option(None, help="Highest txt2img push rate."),
    width: int = typer.Option(None, "--width", help="Default stream width (overrides the model's own size; env DITSTREAM_DEFAULT_WIDTH)."),
    height: int = typer.Option(None, "--height", help="Default stream height (overrides the model's own size; env DITSTREAM_DEFAULT_HEIGHT)."),
    null_delay_ms: NullDelayMs = None,
    redis: str = typer.Option(None, "--redis", help="Gateway mode: take engines from `ditstream worker` "
                              "processes through this Redis (env DITSTREAM_REDIS_URL); --model is then unused."),
    threads: Threads = None,
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the all-in-one server: REST + WebSocket + the engine in one process."""
    import logging

    import uvicorn

    from ditstream.server.api.app import create_app

    backend_args = backend_overrides(resolution, batch, cache_dir, tiny_vae, opt_level)
    if lora:
        lora_specs(lora)  # a malformed --lora is a usage error before anything loads
        backend_args["loras"] = list(lora)
    overrides = {k: v for k, v in dict(
        host=host, port=port, model=model, backend=backend, device=device, dtype=dtype, max_streams=max_streams, max_batch=max_batch,
        max_queued_jobs=max_queued_jobs, api_keys=api_key or None, cors_origins=cors_origin or None,
        max_frame_bytes=max_frame_bytes,
        max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_prompt_chars=max_prompt_chars,
        max_fps=max_fps, default_width=width, default_height=height,
        null_delay_s=null_delay_ms / 1e3 if null_delay_ms is not None else None, redis_url=redis,
        threads=threads).items()
        if v is not None}
    settings = settings_or_exit("ditstream serve", {**overrides, **backend_args})
    logging.getLogger("ditstream.server").info("settings: %s", settings.public())
    # Bind first: a port in use is one clear line now, not after the model has loaded.
    sock = bind_or_exit("ditstream serve", settings.host, settings.port)
    # Load before uvicorn starts, so that a bad model or backend is one clear line, not a lifespan
    # traceback.
    from ditstream.engine.errors import DitstreamError
    from ditstream.server.api.factory import load_runner

    if not settings.redis_url:  # a gateway holds no model: it never imports torch
        from ditstream.engine.threads import set_torch_threads

        set_torch_threads(settings.threads)
    try:
        runner = load_runner(settings)
    except DitstreamError as exc:
        sock.close()
        typer.echo(f"ditstream serve: cannot load model {settings.model!r}: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    app = create_app(settings, runner)
    what = f"gateway for the workers on {settings.public()['redis_url']}" if settings.redis_url \
        else repr(settings.model)
    typer.echo(f"ditstream: serving {what} on http://{settings.host}:{settings.port}/ "
               f"(WebSocket /v1/stream, REST /v1/images/*)")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            ws_max_size=settings.max_frame_bytes + 64 * 1024,
                            # Frames are JPEG already: permessage-deflate would burn ~1 ms of CPU per frame.
                            ws_per_message_deflate=False, ws_ping_interval=20, ws_ping_timeout=20,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5)
    uvicorn.Server(config).run(sockets=[sock])


def bind_or_exit(command: str, host: str, port: int):
    """A listening socket on (host, port), or exit 2 with one line saying why (e.g. the port is in use)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        typer.echo(f"{command}: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from exc
    sock.set_inheritable(True)
    return sock


def bench_server(
    url: str = typer.Option(None, help="Server to measure, e.g. ws://127.0.0.1:8000 (omit: null engine only)."),
    streams: int = typer.Option(4, "--streams", "-n", help="Concurrent WebSocket streams."),
    fps: float = typer.Option(30.0, help="Input frames per second per stream (open loop)."),
    inflight: int = typer.Option(0, "--inflight", min=0, help="Closed loop: keep N frames unanswered per stream, "
                                 "sending the next when an answer comes back (0 = open loop at --fps)."),
    frames: str = typer.Option(None, "--frames", help="A folder of JPEGs to send (scaled to --size if needed) "
                               "instead of the moving pattern."),
    null_delay_ms: float = typer.Option(0.0, "--null-delay-ms", help="Null server: simulated inference per tick."),
    baseline_streams: int = typer.Option(None, "--baseline-streams", help="Also run N streams (e.g. 1) against "
                                         "fresh null servers, interleaved with --streams, and report the ratios."),
    batch_wait: str = typer.Option(None, "--batch-wait", help="Null server's DITSTREAM_BATCH_WAIT; comma-separated "
                                   "values (e.g. 0.5,0) run one arm each, interleaved."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Interleaved repeats of the arms (medians reported)."),
    seconds: float = typer.Option(10.0, "--seconds", "-t", help="Duration of each run."),
    size: str = typer.Option("512x512", help="Frame size WxH (JPEG frames of a moving pattern)."),
    prompt: str = typer.Option("a watercolor painting", help="Prompt sent to each stream."),
    subsampling: str = typer.Option("420", help="Chroma subsampling of the input JPEGs: 420 (what browsers "
                                    "and OpenCV send) or 444."),
    api_key: str = typer.Option(None, envvar="DITSTREAM_API_KEY", help="API key for --url."),
    null: bool = typer.Option(True, "--null/--no-null", help="Also run the same load against a null-engine "
                              "server started for the purpose (isolates server overhead)."),
    transport: str = typer.Option("ws", "--transport", help="ws: WebSocket streams; webrtc: WHIP publishers "
                                  "with WHEP viewers (the webrtc extra); both: side by side on fresh null servers."),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
) -> None:
    """N concurrent streams, open or closed loop: fps and its spread, glass-to-glass p50/p99, drops, batch sizes."""
    import dataclasses
    import json

    from ditstream.bench.server import BenchSpec, run_arms, run_bench
    from ditstream.bench.server_report import format_arms, format_report

    if subsampling not in ("420", "422", "444"):
        raise typer.BadParameter("--subsampling must be 420, 422 or 444")
    w, h = size_arg(size)
    spec = BenchSpec(streams=streams, fps=fps, seconds=seconds, width=w, height=h, prompt=prompt,
                     subsampling=subsampling, inflight=inflight, frames_dir=frames, null_delay_ms=null_delay_ms)
    waits = [float(v) for v in batch_wait.split(",")] if batch_wait else [None]
    if transport not in ("ws", "webrtc", "both"):
        raise typer.BadParameter("--transport must be ws, webrtc or both")
    if transport != "ws":  # against fresh null servers (a --url is measured over the WebSocket only)
        from ditstream.bench.webrtc import format_transports, run_transports

        spec = dataclasses.replace(spec, batch_wait=waits[0])
        runs = run_transports(spec, ["ws", "webrtc"] if transport == "both" else ["webrtc"], repeats)
        typer.echo(format_transports(spec, runs))
        out: dict = {"spec": spec.__dict__, "runs": runs}
    elif baseline_streams is None and len(waits) == 1 and repeats == 1:
        spec = dataclasses.replace(spec, batch_wait=waits[0])
        results = run_bench(spec, url=url, api_key=api_key, null=null)
        typer.echo(format_report(spec, results))
        out = {"spec": spec.__dict__, "results": results}
    else:  # arms against fresh null servers, interleaved
        counts = [n for n in (baseline_streams, streams) if n is not None]
        arms = {f"{n} stream(s)" + ("" if wait is None else f", batch_wait {wait:g}"):
                dataclasses.replace(spec, streams=n, batch_wait=wait) for wait in waits for n in counts}
        runs = run_arms(arms, repeats)
        typer.echo(format_arms(spec, arms, runs))
        out = {"spec": spec.__dict__, "arms": {k: v.__dict__ for k, v in arms.items()}, "runs": runs}
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=2)
