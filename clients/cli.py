"""``ditstream client stream`` and ``ditstream client generate``.

Only typer is imported at module level; the clients speak the wire protocol (no engine/server).
"""

from __future__ import annotations

import typer

client_app = typer.Typer(help="Clients: stream video through the server, or make images over REST.",
                         no_args_is_help=True)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(client_app, name="client")


@client_app.command("stream")
def stream(
    source: str = typer.Argument("pattern", help="'pattern' (built-in), 'webcam' / 'webcam:N' (OpenCV), "
                                 "or a video file (OpenCV or PyAV)."),
    url: str = typer.Option("ws://127.0.0.1:8000/v1/stream", help="The server's stream endpoint."),
    prompt: str = typer.Option("a watercolor painting", help="Prompt."),
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
) -> None:
    """Stream frames to /v1/stream; prints output fps and glass-to-glass latency every second."""
    import asyncio

    from ditstream.clients.stream_client import open_sink, open_source, run_stream

    config: dict = {"prompt": prompt, "mode": mode}
    for k, v in (("strength", strength), ("steps", steps), ("seed", seed), ("size", size)):
        if v is not None:
            config[k] = v
    if mode == "txt2img":
        config["fps"] = fps
    if size:
        width, height = (int(x) for x in size.lower().split("x"))
    else:  # ask the server for its default size: open and close one stream
        width, height = _server_size(url, api_key)
    sinks = open_sink(out, show, fps)

    def on_output(header: dict, jpeg: bytes) -> None:
        for sink in sinks:
            sink(header, jpeg)

    def report(stats) -> None:
        typer.echo(stats.summary())

    if frames is None and seconds is None and source == "pattern":
        seconds = 10.0
    try:
        stats = asyncio.run(run_stream(url, open_source(source, width, height), config=config, fps=fps,
                                       max_frames=frames, seconds=seconds, api_key=api_key,
                                       max_in_flight=in_flight, on_output=on_output, report=report))
    finally:
        for sink in sinks:
            sink.close()
    typer.echo("done: " + stats.summary())
    for err in stats.errors:
        typer.echo(f"server error: {err.get('code')}: {err.get('message')}", err=True)


def _server_size(url: str, api_key: str | None) -> tuple[int, int]:
    import asyncio
    import json

    import websockets

    async def ask() -> tuple[int, int]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with websockets.connect(url, additional_headers=headers) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") != "ready":
                raise typer.BadParameter(f"server refused: {ready}")
            return int(ready["config"]["width"]), int(ready["config"]["height"])

    return asyncio.run(ask())


@client_app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    url: str = typer.Option("http://127.0.0.1:8000", help="Server base URL."),
    image: str = typer.Option(None, help="Input image: img2img through /v1/images/edits."),
    size: str = typer.Option(None, help="WxH (default: the server's / the image's)."),
    n: int = typer.Option(1, help="Number of images."),
    seed: int = typer.Option(None, help="Seed of the first image."),
    steps: int = typer.Option(None, help="Model calls (1-4)."),
    strength: float = typer.Option(None, help="img2img strength (0, 1]."),
    output_format: str = typer.Option("png", help="png | jpeg | webp."),
    out: str = typer.Option("out", help="Output file stem: out.png, or out_0.png, out_1.png for n > 1."),
    api_key: str = typer.Option(None, envvar="DITSTREAM_API_KEY", help="API key (or env DITSTREAM_API_KEY)."),
) -> None:
    """Make images over REST and write them to files."""
    import time
    from pathlib import Path

    from ditstream.clients.rest_client import APIError
    from ditstream.clients.rest_client import generate as rest_generate

    t0 = time.perf_counter()
    try:
        blobs = rest_generate(url, prompt, image=image, size=size, n=n, seed=seed, steps=steps, strength=strength,
                              output_format=output_format, api_key=api_key)
    except APIError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    ext = "jpg" if output_format == "jpeg" else output_format
    for i, blob in enumerate(blobs):
        path = Path(f"{out}.{ext}" if len(blobs) == 1 else f"{out}_{i}.{ext}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        typer.echo(str(path))
    typer.echo(f"{len(blobs)} image(s) in {time.perf_counter() - t0:.2f} s")
