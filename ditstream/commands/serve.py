"""``ditstream serve``: the all-in-one server (REST + WebSocket + the engine), or the gateway in front
of ``ditstream worker`` processes with ``--redis``.

Only typer is imported at module level (``ditstream --help`` stays fast); FastAPI, uvicorn and the
engine are imported inside the command. The start-up it shares with ``worker`` is ``_startup``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

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
    import socket
    from types import FrameType

    from ditstream.server.api.state import AppState
    from ditstream.server.engine_client import EngineClient
    from ditstream.server.settings import Settings


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("serve")(serve)


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
                              "processes through this Redis (env DITSTREAM_REDIS_URL; "
                              "redis+sentinel://HOST:PORT,HOST:PORT/MASTER/DB follows a Sentinel-monitored "
                              "primary; /DB optional); --model is then unused."),
    threads: Threads = None,
    outputs: str = typer.Option(None, "--outputs", metavar="KINDS",
                                help="Allow outputs from the server (restream, record; off by default): rtmp (rtmp:// "
                                     "and rtmps://), srt, file, comma-separated (env DITSTREAM_OUTPUTS). "
                                     "docs/deploy.md, 'Outputs'."),
    output_hosts: list[str] = typer.Option(None, "--output-hosts", metavar="PATTERN",
                                           help="Hosts outputs may reach: *.example.com, an address or a CIDR "
                                                "range (repeatable or comma-separated; default any public host). "
                                                "Loopback, link-local and private addresses only when listed."),
    record_dir: str = typer.Option(None, "--record-dir", metavar="DIR",
                                   help="Folder of file:NAME.mp4 recordings (names only; never overwritten)."),
    output_encoder: str = typer.Option(None, "--output-encoder", help="PyAV video encoder of outputs "
                                       "(default libx264; e.g. h264_nvenc)."),
    output_bitrate: int = typer.Option(None, "--output-bitrate", help="Outputs' bitrate in bits/s "
                                       "(default 2500000)."),
    max_outputs: int = typer.Option(None, "--max-outputs", help="Active outputs per session (default 4)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the all-in-one server: REST + WebSocket + the engine in one process."""
    engine = EngineArgs(model=model, backend=backend, device=device, dtype=dtype, resolution=resolution,
                        batch=batch, cache_dir=cache_dir, tiny_vae=tiny_vae, opt_level=opt_level, lora=lora,
                        max_batch=max_batch, null_delay_ms=null_delay_ms, threads=threads)
    settings = settings_for(
        "ditstream serve", engine, logging.getLogger("ditstream.server"), host=host, port=port,
        max_streams=max_streams, max_queued_jobs=max_queued_jobs, api_keys=api_key or None,
        cors_origins=cors_origin or None, max_frame_bytes=max_frame_bytes, max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels, max_prompt_chars=max_prompt_chars, max_fps=max_fps, default_width=width,
        default_height=height, redis_url=redis, outputs=outputs, record_dir=record_dir,
        output_hosts=",".join(output_hosts) if output_hosts else None, output_encoder=output_encoder,
        output_bitrate=output_bitrate, max_outputs=max_outputs)
    # Bind first: a port in use is one clear line now, not after the model has loaded.
    sock = bind_or_exit("ditstream serve", settings.host, settings.port)
    # Load before uvicorn starts, so that a bad model or backend is one clear line, not a lifespan
    # traceback.
    try:
        runner = load_engine_or_exit("ditstream serve", settings)
    except typer.Exit:
        sock.close()
        raise
    _run_uvicorn(settings, runner, sock, log_level)


def _run_uvicorn(settings: Settings, runner: EngineClient, sock: socket.socket, log_level: str) -> None:
    """Serve the app on the bound socket until SIGTERM/SIGINT, then hand over (``_handover_server``)."""
    import uvicorn

    from ditstream.server.api.app import create_app

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
    _handover_server(config, app.state.ditstream).run(sockets=[sock])


def _handover_server(config: Any, state: AppState) -> Any:
    """A ``uvicorn.Server`` that hands over before it shuts down: on SIGTERM/SIGINT ``/ready`` is 503 at
    once (set in the signal handler, not on uvicorn's next 0.1 s tick), then ``app.hand_over`` closes
    the live streams with 1012 after ``shutdown_grace_s``, and only then does uvicorn stop listening,
    wait for the REST requests in flight and run the lifespan's shutdown. uvicorn alone would
    ``fail_connection(1012)`` every WebSocket at once, with ``/ready`` still 200."""
    import uvicorn

    from ditstream.server.api.app import hand_over

    class HandoverServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state.shutting_down = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if not self.force_exit:  # a second Ctrl-C: no grace
                await hand_over(state)
            await super().shutdown(sockets)

    return HandoverServer(config)


def bind_or_exit(command: str, host: str, port: int) -> socket.socket:
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
