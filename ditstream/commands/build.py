"""``ditstream build-engine``.

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


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("build-engine")(build_engine)
