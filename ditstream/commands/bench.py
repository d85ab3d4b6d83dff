"""``ditstream bench ...``: every bench's options, parsed here and handed to its module under
``ditstream/bench/`` (engine, threads, quality, server, scale, gateway, load, soak, gpu). The timing
targets live in the benches and docs/benchmarks.md, not in these option parsers.

Only typer is imported at module level (``ditstream --help`` stays fast); each bench loads inside its
command.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from ditstream.commands._args import (
    Batches,
    CacheDir,
    OptLevel,
    Resolutions,
    TinyVae,
    backend_options,
    parse_resolutions,
    size_arg,
)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """The bench subcommands, in the order ``ditstream bench --help`` lists them."""
    for name, command in (("engine", bench_engine), ("threads", bench_threads), ("quality", bench_quality),
                          ("server", bench_server), ("scale", bench_scale), ("gateway", bench_gateway),
                          ("load", bench_load), ("soak", bench_soak), ("gpu", bench_gpu)):
        bench.command(name)(command)


def _write_json(path: str | None, out: Any) -> None:
    """``--json FILE``: the results as JSON too (nothing without the option)."""
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


def bench_engine(
    model: str = typer.Option("demo", help="'demo', a model folder, or a synthetic preset (small, medium, tiny)."),
    size: int = typer.Option(64, help="Square frame size in pixels."),
    frames: int = typer.Option(12, help="Frames per clip."),
    streams: int = typer.Option(8, help="Streams for the cross-batching measurement."),
    steps: int = typer.Option(4, help="Steps for the stream-batch measurement."),
    repeats: int = typer.Option(5, help="Interleaved repeats of each pair of arms (medians are reported)."),
    threads: int = typer.Option(0, help="torch CPU threads; 0 = torch's default (all cores). On a CPU shared with "
                                "other jobs, 1 avoids OpenMP oversubscription."),
    backend: str = typer.Option("torch", help="torch, compile, onnx, tensorrt or auto."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    resolution: Resolutions = None,
    batch: Batches = None,
    cache_dir: CacheDir = None,
    tiny_vae: TinyVae = None,
    opt_level: OptLevel = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Stream batch vs sequential; N streams cross-batched vs one at a time; SSF skip rates; attention memory cost."""
    from ditstream.bench.engine import format_table, run_engine_bench

    options = backend_options(resolution, batch, cache_dir, tiny_vae, opt_level)
    result = run_engine_bench(model=model, size=size, frames=frames, streams=streams, steps=steps,
                              repeats=repeats, threads=threads or None, backend=backend, options=options,
                              device=device)
    typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))


def bench_threads(
    model: str = typer.Option("demo", help="'demo' or a model folder."),
    size: int = typer.Option(64, help="Square frame size in pixels."),
    frames: int = typer.Option(12, help="Frames per clip."),
    threads: str = typer.Option("1,2,0", help="Thread counts to compare, comma-separated (0 = torch's default)."),
    load: int = typer.Option(1, help="Busy processes to run meanwhile (a shared CPU); 0 = an idle machine."),
    repeats: int = typer.Option(5, help="Interleaved repeats of every arm (medians are reported)."),
) -> None:
    """ms per frame for each torch thread count on a CPU shared with `--load` busy processes."""
    from ditstream.bench.engine import run_threads_bench

    try:
        candidates = tuple(int(t) for t in threads.split(","))
    except ValueError as exc:
        raise typer.BadParameter("a comma-separated list of integers", param_hint="--threads") from exc
    result = run_threads_bench(model=model, size=size, frames=frames, candidates=candidates, load=load,
                               repeats=repeats)
    typer.echo(json.dumps(result, indent=2))


def bench_quality(
    model: str = typer.Option("demo", help="Model folder (default: the packaged demo model)."),
    n: int = typer.Option(280, help="txt2img images (cycled over all 280 captions)."),
    frames: int = typer.Option(16, help="Frames of the synthetic moving-shape video for img2img."),
    strength: float = typer.Option(-1.0, help="img2img strength (default: the model's own default)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(2),
    json_out: str = typer.Option("", "--json", help="Also write the figures as JSON here."),
) -> None:
    """Score one-step txt2img/img2img (and 2-step) with the model-independent evaluator; measure fps."""
    from ditstream.engine.demo.quality import format_report, run_quality

    report = run_quality(model, n=n, frames=frames, strength=None if strength < 0 else strength,
                         seed=seed, threads=threads)
    typer.echo(format_report(report))
    _write_json(json_out, report)


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
    from ditstream.bench.server import BenchSpec
    from ditstream.bench.server_main import TRANSPORTS, run_server_bench

    if subsampling not in ("420", "422", "444"):
        raise typer.BadParameter("--subsampling must be 420, 422 or 444")
    w, h = size_arg(size)
    spec = BenchSpec(streams=streams, fps=fps, seconds=seconds, width=w, height=h, prompt=prompt,
                     subsampling=subsampling, inflight=inflight, frames_dir=frames, null_delay_ms=null_delay_ms)
    waits: list[float | None] = [float(v) for v in batch_wait.split(",")] if batch_wait else [None]
    if transport not in TRANSPORTS:
        raise typer.BadParameter("--transport must be ws, webrtc or both")
    report, out = run_server_bench(spec, transport=transport, batch_waits=waits, baseline_streams=baseline_streams,
                                   repeats=repeats, url=url, api_key=api_key, null=null)
    typer.echo(report)
    _write_json(json_out, out)


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
    from ditstream.bench.scale import ScaleBenchSpec, format_report, run_scale_bench

    spec = ScaleBenchSpec(model=model, workers=workers, jobs=jobs, concurrency=concurrency, size=size, steps=steps,
                          threads=threads, max_jobs=max_jobs, backend=backend, device=device,
                          null_delay_ms=null_delay_ms)
    results = run_scale_bench(spec, redis_url=redis)
    typer.echo(format_report(spec, results))
    _write_json(json_out, {"spec": spec.__dict__, "results": results})


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
    from ditstream.bench.gateway import GatewayBenchSpec, format_report, run_gateway_bench

    width, height = size_arg(size) or (512, 512)
    spec = GatewayBenchSpec(fps=fps, inflight=inflight, seconds=seconds, rounds=rounds, width=width, height=height,
                            null_delay_ms=null_delay_ms, idle_s=idle_s)
    results = run_gateway_bench(spec)
    typer.echo(format_report(spec, results))
    _write_json(json_out, results)


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
    _write_json(json_out, out)
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
    from ditstream.bench.load import NullServerConfig, null_server, soak

    cfg = NullServerConfig(delay_ms=0.0, max_streams=4, max_queued_jobs=16, mode=_mode(mode))
    with null_server(cfg) as (base, pid):
        out = {"mode": cfg.mode, **soak(base, pid, cycles, requests, cfg.width, cfg.height, warmup=warmup)}
    typer.echo(json.dumps(out, indent=2))
    _write_json(json_out, out)
    if out["ws_bad"] or out["rest_bad"] or out["rss_growth_pct"] > max_growth_pct:
        raise typer.Exit(1)


def _mode(mode: str) -> str:
    from ditstream.bench.load import MODES

    if mode not in MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def bench_gpu(
    resolution: Resolutions = None,
    batch: Batches = None,
    backend: list[str] = typer.Option(["torch", "tensorrt", "compile", "onnx"], "--backend",
                                      help="Backends to measure (repeatable); diffusers is always the baseline."),
    dtype: str = typer.Option("bf16", help="Model dtype (bf16 or fp16; DC-AE runs bf16/fp32)."),
    budget_s: float = typer.Option(480.0, help="Time box: no new backend starts (and engine builds are "
                                               "cancelled) once this many seconds have passed."),
    opt_level: OptLevel = None,
    cache_dir: CacheDir = None,
    json_out: str | None = typer.Option(None, "--json-out", help="Write the JSON result to this file (rewritten "
                                                                 "after every row, so a cut-short run keeps its figures)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    watchdog_s: float | None = typer.Option(None, "--watchdog-s", help="End the process (status 3, JSON kept) "
                                            "this many seconds after the start (default: budget + 60)."),
) -> None:
    """One-step img2img fps per backend on the real SANA-Sprint 0.6B + DC-AE (random weights) vs diffusers.

    Default grid: 512² batch 1 and 4, 1024² batch 1 — exactly the TensorRT profile built. -r/-b measure
    every size × batch instead (square sizes); the profile and cache are the ones `build-engine` uses for
    the same options. Median and p90 of >= 10 calls (CUDA events), each backend checked against torch."""
    from ditstream.bench.gpu import BenchRefused, run_gpu_bench
    from ditstream.bench.gpu_timing import format_table, to_json

    sizes = parse_resolutions(resolution) or ()
    if any(w != h for w, h in sizes):
        raise typer.BadParameter("the GPU bench measures square sizes (N or NxN)", param_hint="--resolution")
    options = backend_options(None, batch, cache_dir, opt_level=opt_level)
    try:
        result = run_gpu_bench(resolutions=[w for w, _ in sizes] or None, batches=list(options.batches) or None,
                               backends=backend, dtype=dtype, budget_s=budget_s, cache_dir=options.cache_dir,
                               trt_opt_level=options.opt_level if options.opt_level is not None else 3,
                               progress=lambda msg: typer.echo(msg, err=True), json_out=json_out,
                               watchdog_s=watchdog_s)
    except BenchRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(to_json(result) if as_json else format_table(result))
