"""``ditstream client stream`` and ``ditstream client generate``.

Only typer is imported at module level; the clients speak the wire protocol (no engine/server).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from ditstream.commands._args import size_arg

#: Exit codes of the client commands (README, "Exit codes"): 0 done; 1 the server could not be
#: reached, refused or answered an error; 2 bad arguments (typer's own usage errors are 2 as well).
EXIT_SERVER = 1
EXIT_USAGE = 2
OUTPUT_FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def stream_url(url: str) -> str:
    """``http://h:p`` (the server) → ``ws://h:p/v1/stream``; a ws:// URL with a path is kept as given."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise typer.BadParameter(f"expected http(s):// or ws(s)://, got {url!r}", param_hint="--url")
    path = parts.path if parts.path not in ("", "/") else "/v1/stream"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


@contextlib.contextmanager
def _server_errors(command: str, url: str) -> Iterator[None]:
    """Turn what a down, refusing or failing server raises into one line and an exit code."""
    import httpx
    import websockets

    from ditstream.clients.rest_client import APIError

    def fail(message: str, code: int = EXIT_SERVER) -> typer.Exit:
        typer.echo(f"ditstream client {command}: {message}", err=True)
        return typer.Exit(code)

    try:
        yield
    except APIError as exc:
        raise fail(str(exc)) from exc
    except websockets.InvalidStatus as exc:
        raise fail(f"{url} refused the stream: HTTP {exc.response.status_code}") from exc
    except websockets.ConnectionClosedError as exc:
        rcvd = exc.rcvd
        why = f"{rcvd.code} {rcvd.reason}".strip() if rcvd else "no close frame"
        raise fail(f"the server closed the stream: {why}") from exc
    except (httpx.TransportError, websockets.InvalidHandshake, OSError, TimeoutError) as exc:
        raise fail(f"cannot reach the server at {url}: {exc or type(exc).__name__} "
                   "(is `ditstream serve` running there?)") from exc

client_app = typer.Typer(help="Clients: stream video through the server, or make images over REST.",
                         no_args_is_help=True)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(client_app, name="client")


@client_app.command("stream")
def stream(
    source: str = typer.Argument("pattern", help="'pattern' (built-in), 'webcam' / 'webcam:N' (OpenCV), "
                                 "'ndi:NAME' (an NDI source; ditstream[ndi]), or a video file (OpenCV or PyAV)."),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="DITSTREAM_URL",
                            help="The server (http://host:port) or its stream endpoint (ws://host:port/v1/stream)."),
    prompt: str = typer.Option(None, help="Prompt (default: the model's own default prompt)."),
    strength: float = typer.Option(None, help="img2img strength (0, 1]."),
    steps: int = typer.Option(None, help="Model calls per frame (1-4)."),
    seed: int = typer.Option(None, help="Noise seed."),
    size: str = typer.Option(None, help="Frame size WxH (default: the server's)."),
    mode: str = typer.Option("img2img", help="img2img | txt2img (the server pushes frames at --fps)."),
    fps: float = typer.Option(30.0, help="Frames per second to send (txt2img: to receive)."),
    frames: int = typer.Option(None, help="Stop after this many frames."),
    seconds: float = typer.Option(None, help="Stop after this many seconds."),
    out: str = typer.Option(None, help="Write outputs: a folder (JPEG per frame) or a video file (.mp4/.avi)."),
    show: bool = typer.Option(False, help="Show outputs in a window (OpenCV)."),
    api_key: str = typer.Option(None, envvar="DITSTREAM_API_KEY", help="API key (or env DITSTREAM_API_KEY)."),
    in_flight: int = typer.Option(2, help="Unanswered frames allowed at once."),
    temporal: float = typer.Option(None, help="Attention memory across frames, [0, 1] (0 = off; torch or compile backend)."),
    motion_adaptive: bool = typer.Option(None, "--motion-adaptive/--no-motion-adaptive",
                                         help="Scale temporal and feedback down by the input's motion."),
    osc_port: int = typer.Option(None, help="Take config changes as OSC messages on this UDP port "
                                 "(/ditstream/prompt, /ditstream/strength, ...; ditstream[studio])."),
    osc_host: str = typer.Option("127.0.0.1", help="Address the OSC port listens on (0.0.0.0: every interface)."),
    ndi_out: str = typer.Option(None, help="Publish the outputs as the NDI source NAME (ditstream[ndi])."),
) -> None:
    """Stream frames to /v1/stream; prints output fps and glass-to-glass latency every second."""
    from ditstream.commands._studio import osc_control

    url = stream_url(url)
    wh = size_arg(size)
    config = _stream_config(mode, prompt, strength, steps, seed, size, fps, temporal=temporal,
                            motion_adaptive=motion_adaptive)
    control = osc_control(osc_port, osc_host)
    _probe_source(source)  # the source opens first: a missing camera or file is a usage error, whatever the server
    if wh:
        width, height = wh
    else:  # ask the server for its default size: open and close one stream
        with _server_errors("stream", url):
            width, height = _server_size(url, api_key)
    if frames is None and seconds is None and source == "pattern":
        seconds = 10.0
    stats = _run_with_sinks(url, source, width, height, config, fps=fps, max_frames=frames, seconds=seconds,
                            api_key=api_key, in_flight=in_flight, out=out, show=show, ndi_out=ndi_out,
                            control=control)
    typer.echo("done: " + stats.summary())
    for err in stats.errors:
        typer.echo(f"server error: {err.get('code')}: {err.get('message')}", err=True)
    if stats.errors:
        raise typer.Exit(EXIT_SERVER)


def _stream_config(mode: str, prompt: str | None, strength: float | None, steps: int | None, seed: int | None,
                   size: str | None, fps: float, *, temporal: float | None = None,
                   motion_adaptive: bool | None = None) -> dict:
    """The stream's first config message from the options given (unset ones: the server's defaults)."""
    if mode not in ("img2img", "txt2img"):
        raise typer.BadParameter(f"mode must be img2img or txt2img, got {mode!r}", param_hint="--mode")
    given = {"prompt": prompt, "strength": strength, "steps": steps, "seed": seed, "size": size,
             "temporal": temporal, "motion_adaptive": motion_adaptive}
    config: dict = {"mode": mode, **{k: v for k, v in given.items() if v is not None}}
    if mode == "txt2img":
        config["fps"] = fps
    return config


def _probe_source(source: str) -> None:
    """Open the source and read one frame, or exit 2 with one line (no camera, no file, no frames)."""
    from ditstream.clients.media import SourceError, open_source

    try:
        probe = open_source(source, 16, 16)
        next(probe)
        probe.close()
    except SourceError as exc:
        typer.echo(f"ditstream client stream: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    except StopIteration:
        typer.echo(f"ditstream client stream: {source!r} has no frames", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _run_with_sinks(url: str, source: str, width: int, height: int, config: dict, *, fps: float,
                    max_frames: int | None, seconds: float | None, api_key: str | None, in_flight: int,
                    out: str | None, show: bool, ndi_out: str | None = None,
                    control=None):  # -> clients.stream_client.StreamStats
    """Stream the source, handing every output to the sinks (--out, --show, --ndi-out) and config changes
    from ``control`` (--osc-port) to the stream; the source and the sinks are closed after."""
    import asyncio

    from ditstream.clients.media import SourceError, open_sink, open_source
    from ditstream.clients.osc import OscError
    from ditstream.clients.stream_client import run_stream

    try:
        frames = open_source(source, width, height)  # first: an NDI search is quicker before our own sender
    except SourceError as exc:
        typer.echo(f"ditstream client stream: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    try:
        sinks = open_sink(out, show, fps, ndi_out)
    except SourceError as exc:
        frames.close()
        typer.echo(f"ditstream client stream: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc

    def on_output(header: dict, jpeg: bytes) -> None:
        for sink in sinks:
            sink(header, jpeg)

    def report(stats) -> None:
        typer.echo(stats.summary())

    try:
        with _server_errors("stream", url):
            return asyncio.run(run_stream(url, frames, config=config, fps=fps, max_frames=max_frames,
                                          seconds=seconds, api_key=api_key, max_in_flight=in_flight,
                                          on_output=on_output, report=report, control=control))
    except SourceError as exc:  # the source failed mid-stream (an NDI source lost)
        typer.echo(f"ditstream client stream: {exc}", err=True)
        raise typer.Exit(EXIT_SERVER) from exc
    except OscError as exc:
        typer.echo(f"ditstream client stream: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    finally:
        for closable in (*sinks, frames):
            closable.close()


def _server_size(url: str, api_key: str | None) -> tuple[int, int]:
    import asyncio
    import json

    import websockets

    async def ask() -> tuple[int, int]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with websockets.connect(url, additional_headers=headers) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") != "ready":
                typer.echo(f"ditstream client stream: the server refused the stream: {ready}", err=True)
                raise typer.Exit(EXIT_SERVER)
            return int(ready["config"]["width"]), int(ready["config"]["height"])

    return asyncio.run(ask())


@client_app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="DITSTREAM_URL", help="Server base URL."),
    image: str = typer.Option(None, help="Input image: img2img through /v1/images/edits."),
    size: str = typer.Option(None, help="WxH (default: the server's / the image's)."),
    n: int = typer.Option(1, help="Number of images."),
    seed: int = typer.Option(None, help="Seed of the first image."),
    steps: int = typer.Option(None, help="Model calls (1-4)."),
    strength: float = typer.Option(None, help="img2img strength (0, 1]."),
    output_format: str = typer.Option(None, help="png | jpeg | webp (default: --out's extension, else png)."),
    out: str = typer.Option("out", help="Output file (out.png) or stem: out → out.png, or out_0.png, out_1.png "
                            "for n > 1."),
    api_key: str = typer.Option(None, envvar="DITSTREAM_API_KEY", help="API key (or env DITSTREAM_API_KEY)."),
) -> None:
    """Make images over REST and write them to files."""
    import time
    from pathlib import Path

    from ditstream.clients.rest_client import generate as rest_generate

    size_arg(size)
    if image is not None and not Path(image).is_file():
        raise typer.BadParameter(f"{image!r} does not exist or is not a file", param_hint="--image")
    stem, suffix = str(out), Path(out).suffix.lower().lstrip(".")
    if suffix:
        by_ext = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
        if suffix not in by_ext:
            raise typer.BadParameter(f"cannot write .{suffix}; use .png, .jpg or .webp (or a stem)",
                                     param_hint="--out")
        if output_format is not None and output_format != by_ext[suffix]:
            raise typer.BadParameter(f"--out {out} is not --output-format {output_format}", param_hint="--out")
        output_format, stem = by_ext[suffix], stem[: -len(suffix) - 1]
    output_format = output_format or "png"
    if output_format not in OUTPUT_FORMATS:
        raise typer.BadParameter(f"use png, jpeg or webp, not {output_format!r}", param_hint="--output-format")

    t0 = time.perf_counter()
    with _server_errors("generate", url):
        blobs = rest_generate(url, prompt, image=image, size=size, n=n, seed=seed, steps=steps, strength=strength,
                              output_format=output_format, api_key=api_key)
    ext = OUTPUT_FORMATS[output_format]
    for i, blob in enumerate(blobs):
        path = Path(f"{stem}.{ext}" if len(blobs) == 1 else f"{stem}_{i}.{ext}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        typer.echo(str(path))
    typer.echo(f"{len(blobs)} image(s) in {time.perf_counter() - t0:.2f} s")
