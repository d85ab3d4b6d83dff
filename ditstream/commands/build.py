"""``ditstream build-engine`` and ``ditstream bench gpu``.

Only typer is imported at module level (``ditstream --help`` stays fast); torch, onnx and tensorrt
are imported inside the commands.
"""

from __future__ import annotations

import typer


def _parse_size(text: str) -> tuple[int, int]:
    """``"512"`` or ``"768x512"`` (width x height) → (width, height)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise typer.BadParameter(f"size must look like 512 or 768x512 (width x height), got {text!r}")


def build_engine(
    model: str = typer.Option("demo", help="Model folder in diffusers layout, hub id, or 'demo'."),
    resolution: list[str] = typer.Option(["512"], "--resolution", "-r",
                                         help="Sizes to serve, WIDTHxHEIGHT or N (repeatable); the first is opt."),
    batch: list[int] = typer.Option([1, 4], "--batch", "-b",
                                    help="Batch sizes to serve (repeatable); min/max bound the profile, first is opt."),
    component: list[str] = typer.Option(["transformer", "vae_encoder", "vae_decoder"], "--component", "-c",
                                        help="Which networks to build (repeatable)."),
    dtype: str = typer.Option("auto", help="fp32, fp16 or bf16 (auto: bf16 on CUDA). DC-AE is never fp16."),
    seq_len: int | None = typer.Option(None, help="Prompt length in tokens (default: the model's max_sequence_length)."),
    opt_level: int = typer.Option(3, min=0, max=5, help="TensorRT builder optimisation level."),
    cache_dir: str | None = typer.Option(None, help="Engine cache folder (default ~/.cache/ditstream/engines)."),
    onnx_only: bool = typer.Option(False, "--onnx-only", help="Export ONNX only (no TensorRT; works on CPU)."),
    force: bool = typer.Option(False, help="Rebuild even if the cache holds a valid engine."),
    list_only: bool = typer.Option(False, "--list", help="List cached engines and exit."),
) -> None:
    """Export ONNX and build TensorRT engines for the sizes and batch sizes you will serve (cached)."""
    import json
    import logging
    import time
    from pathlib import Path

    from ditstream.trt_build.cache import BuildProfile, EngineCache

    cache = EngineCache(Path(cache_dir) if cache_dir else None)
    if list_only:
        for entry in cache.entries():
            spec = entry.get("spec", {})
            typer.echo(f"{entry['path']}\n    {spec.get('kind')} {spec.get('component')} {spec.get('dtype')} "
                       f"TRT {spec.get('trt_version') or '-'} sm {spec.get('compute_capability') or '-'} "
                       f"profile {json.dumps(spec.get('profile'))}")
        return
    sizes = [_parse_size(r) for r in resolution]
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components
    from ditstream.trt_build.export import COMPONENTS, get_or_export

    unknown = [c for c in component if c not in COMPONENTS]
    if unknown:
        raise typer.BadParameter(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    if not onnx_only:
        from ditstream.trt_build.build import compute_capability, trt_version

        if not trt_version():
            typer.echo("error: TensorRT is not installed (pip install tensorrt); use --onnx-only to export only",
                       err=True)
            raise typer.Exit(2)
        if not compute_capability():
            typer.echo("error: building TensorRT engines needs a CUDA GPU; use --onnx-only to export only", err=True)
            raise typer.Exit(2)
    device = "cpu" if onnx_only else "cuda"
    components = load_components(ModelConfig(model=model, device=device, dtype=dtype))
    profile = BuildProfile.from_request(sizes, batch, seq_len=seq_len or components.max_sequence_length)
    logging.getLogger("ditstream.trt_build").setLevel(logging.INFO)
    typer.echo(f"profile: {profile.describe()}")
    for name in component:
        started = time.monotonic()
        if onnx_only:
            path = get_or_export(components, name, cache=cache)
        else:
            from ditstream.trt_build.build import get_or_build_engine

            path = get_or_build_engine(components, name, profile, cache=cache, opt_level=opt_level, force=force)
        typer.echo(f"{name}: {path} ({time.monotonic() - started:.1f} s)")


def bench_gpu(
    resolution: list[int] = typer.Option([512, 1024], "--resolution", "-r", help="Square sizes (repeatable)."),
    batch: list[int] = typer.Option([1, 4, 8], "--batch", "-b", help="Batch sizes (repeatable)."),
    backend: list[str] = typer.Option(["torch", "tensorrt", "compile", "onnx"], "--backend",
                                      help="Backends to measure (repeatable); diffusers is always the baseline."),
    dtype: str = typer.Option("bf16", help="Model dtype (bf16 or fp16; DC-AE runs bf16/fp32)."),
    budget_s: float = typer.Option(480.0, help="Time box: no new backend starts (and engine builds are "
                                               "cancelled) once this many seconds have passed."),
    opt_level: int = typer.Option(3, min=0, max=5, help="TensorRT builder optimisation level."),
    cache_dir: str | None = typer.Option(None, help="Engine cache folder."),
    json_out: str | None = typer.Option(None, "--json-out", help="Also write the JSON result to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
) -> None:
    """One-step img2img fps per backend on the real SANA-Sprint 0.6B + DC-AE (random weights) vs diffusers."""
    from ditstream.bench.gpu import BenchRefused, format_table, run_gpu_bench, to_json

    try:
        result = run_gpu_bench(resolutions=resolution, batches=batch, backends=backend, dtype=dtype,
                               budget_s=budget_s, cache_dir=cache_dir, trt_opt_level=opt_level,
                               progress=lambda msg: typer.echo(msg, err=True))
    except BenchRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    text = to_json(result)
    if json_out:
        from pathlib import Path

        Path(json_out).write_text(text)
    typer.echo(text if as_json else format_table(result))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("build-engine")(build_engine)
    bench.command("gpu")(bench_gpu)
