"""``ditstream build-engine`` and ``ditstream bench gpu``.

Only typer is imported at module level (``ditstream --help`` stays fast); torch, onnx and tensorrt
are imported inside the commands.
"""

from __future__ import annotations

import typer

from ditstream.commands._args import (
    Batches,
    CacheDir,
    OptLevel,
    Resolutions,
    backend_options,
    parse_resolutions,
)


def build_engine(
    model: str = typer.Option("demo", help="Model folder in diffusers layout, hub id, or 'demo'."),
    resolution: Resolutions = None,
    batch: Batches = None,
    component: list[str] = typer.Option(["transformer", "vae_encoder", "vae_decoder"], "--component", "-c",
                                        help="Which networks to build (repeatable)."),
    dtype: str = typer.Option("auto", help="fp32, fp16 or bf16 (auto: bf16 on CUDA). DC-AE is never fp16."),
    seq_len: int | None = typer.Option(None, help="Prompt length in tokens (default: the model's max_sequence_length)."),
    opt_level: OptLevel = None,
    cache_dir: CacheDir = None,
    onnx_only: bool = typer.Option(False, "--onnx-only", help="Export ONNX only (no TensorRT; works on CPU)."),
    force: bool = typer.Option(False, help="Rebuild even if the cache holds a valid engine."),
    list_only: bool = typer.Option(False, "--list", help="List cached engines and exit."),
) -> None:
    """Export ONNX and build TensorRT engines for the sizes and batch sizes you will serve (cached).

    `serve`, `worker`, `generate` and the benches take the same -r/-b/--cache-dir/--opt-level and then
    load exactly these entries (one key function: trt_build/specs.py)."""
    import json
    import logging
    import time

    from ditstream.trt_build.cache import EngineCache

    options = backend_options(None if list_only else resolution, None if list_only else batch, cache_dir,
                              opt_level=opt_level, seq_len=seq_len)
    cache = EngineCache(options.cache_dir)
    if list_only:
        for entry in cache.entries():
            spec = entry.get("spec", {})
            typer.echo(f"{entry['path']}\n    {spec.get('kind')} {spec.get('component')} {spec.get('dtype')} "
                       f"TRT {spec.get('trt_version') or '-'}{('-' + spec['trt_flavour']) if spec.get('trt_flavour') else ''} "
                       f"sm {spec.get('compute_capability') or '-'} {spec.get('gpu') or ''} "
                       f"profile {json.dumps(spec.get('profile'))}")
        return
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components
    from ditstream.trt_build.export import COMPONENTS, get_or_export
    from ditstream.trt_build.specs import DEFAULT_OPT_LEVEL, build_profile

    unknown = [c for c in component if c not in COMPONENTS]
    if unknown:
        raise typer.BadParameter(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    if not onnx_only:
        from ditstream.trt_build.build import compute_capability, trt_version
        from ditstream.trt_build.specs import trt_install_hint

        if not trt_version():
            typer.echo(f"error: TensorRT is not installed ({trt_install_hint()}); use --onnx-only to export only",
                       err=True)
            raise typer.Exit(2)
        if not compute_capability():
            typer.echo("error: building TensorRT engines needs a CUDA GPU; use --onnx-only to export only", err=True)
            raise typer.Exit(2)
    device = "cpu" if onnx_only else "cuda"
    components = load_components(ModelConfig(model=model, device=device, dtype=dtype))
    # The profile (and with it the cache key) every backend computes from the same options.
    profile = build_profile(components, options.resolutions, options.batches, seq_len=options.seq_len)
    opt = options.opt_level if options.opt_level is not None else DEFAULT_OPT_LEVEL
    logging.getLogger("ditstream.trt_build").setLevel(logging.INFO)
    typer.echo(f"profile: {profile.describe()}")
    for name in component:
        started = time.monotonic()
        if onnx_only:
            path = get_or_export(components, name, cache=cache)
        else:
            from ditstream.trt_build.build import get_or_build_engine

            path = get_or_build_engine(components, name, profile, cache=cache, opt_level=opt, force=force)
        typer.echo(f"{name}: {path} ({time.monotonic() - started:.1f} s)")


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


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("build-engine")(build_engine)
    bench.command("gpu")(bench_gpu)
