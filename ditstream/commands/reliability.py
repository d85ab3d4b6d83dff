"""``ditstream bench load`` and ``ditstream bench soak`` (figures in docs/reliability.md).

Only typer is imported at module level; the bench code loads inside the commands.
"""

from __future__ import annotations

import typer

from ditstream.commands._args import size_arg


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command("load")(bench_load)
    bench.command("soak")(bench_soak)


def bench_load(
    url: str = typer.Option(None, help="Server to load, e.g. http://127.0.0.1:8000 (omit: a null-engine server "
                            "is started per level with the capacity settings below)."),
    levels: str = typer.Option("0.5,1.5", help="Comma-separated multiples of capacity to run."),
    rate: float = typer.Option(None, help="With --url: REST requests/s (Poisson) instead of --levels."),
    streams: int = typer.Option(None, help="With --url and --rate: WebSocket streams."),
    fps: float = typer.Option(10.0, help="Input frames per second per stream."),
    seconds: float = typer.Option(20.0, "--seconds", "-t", help="Duration of each run."),
    delay_ms: float = typer.Option(100.0, help="Null engine: time per tick."),
    max_streams: int = typer.Option(4, help="Null engine server: streams admitted (capacity)."),
    max_queued_jobs: int = typer.Option(4, help="Null engine server: REST images admitted at once."),
    size: str = typer.Option("64x64", help="Image size WxH."),
    mode: str = typer.Option("engine", "--mode", help="Null server started here: engine (all in one process) or "
                             "gateway (ditstream serve --redis in front of one null worker on a private "
                             "redis-server; needs redis-server installed)."),
    api_key: str = typer.Option(None, envvar="DITSTREAM_API_KEY", help="API key for --url."),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
    check: bool = typer.Option(True, "--check/--no-check", help="Exit 1 unless rejections were clean and the "
                               "p99 ratio is within 2 (levels mode)."),
) -> None:
    """Open-loop load: REST at a Poisson rate + K streams at F fps; throughput, p50/p99, rejections."""
    import asyncio
    import json

    from ditstream.bench.load import LoadSpec, NullServerConfig, format_levels, run_levels, run_load

    w, h = size_arg(size)
    if url and rate is not None:
        spec = LoadSpec(rate=rate, streams=streams or 0, fps=fps, seconds=seconds, width=w, height=h,
                        api_key=api_key)
        out: dict = asyncio.run(run_load(url, spec)).summary()
        typer.echo(json.dumps(out, indent=2))
        ok = out["unclean"] == 0
    else:
        cfg = NullServerConfig(delay_ms=delay_ms, max_streams=max_streams, max_queued_jobs=max_queued_jobs,
                               width=w, height=h, mode=_mode(mode))
        out = run_levels(cfg, [float(x) for x in levels.split(",")], seconds, fps, url=url)
        typer.echo(format_levels(out))
        ok = all(r["unclean"] == 0 for r in out["runs"].values()) and out["p99_ratio"] <= 2.0
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=2)
    if check and not ok:
        raise typer.Exit(1)


def bench_soak(
    cycles: int = typer.Option(1000, help="WebSocket connect/config/frame/disconnect cycles."),
    requests: int = typer.Option(1000, help="REST image requests."),
    warmup: int = typer.Option(50, help="Cycles and requests before the first memory reading."),
    mode: str = typer.Option("engine", "--mode", help="Null server started here: engine (all in one process) or "
                             "gateway (ditstream serve --redis in front of one null worker on a private "
                             "redis-server; needs redis-server installed)."),
    max_growth_pct: float = typer.Option(5.0, help="Exit 1 above this resident-memory growth."),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
) -> None:
    """Leak check: a fresh null-engine server, RSS after warm-up vs after the soak (the gateway's own RSS
    with --mode gateway)."""
    import json

    from ditstream.bench.load import NullServerConfig, null_server, soak

    cfg = NullServerConfig(delay_ms=0.0, max_streams=4, max_queued_jobs=16, mode=_mode(mode))
    with null_server(cfg) as (base, pid):
        out = {"mode": cfg.mode, **soak(base, pid, cycles, requests, cfg.width, cfg.height, warmup=warmup)}
    typer.echo(json.dumps(out, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=2)
    if out["ws_bad"] or out["rest_bad"] or out["rss_growth_pct"] > max_growth_pct:
        raise typer.Exit(1)


def _mode(mode: str) -> str:
    from ditstream.bench.load import MODES

    if mode not in MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode
