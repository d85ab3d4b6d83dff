"""Argument parsing shared by the commands: engine validators turned into usage errors (exit 2), and
the backend options (profile, engine cache, tiny VAE) defined once for every command that builds a
backend: ``build-engine``, ``serve``, ``worker``, ``generate``, ``bench engine`` and ``bench gpu``; and
the engine options (model, backend, device, dtype, threads) of ``serve``, ``worker`` and ``generate``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from ditstream.engine.config import BackendOptions


def size_arg(text: str | None, *, param_hint: str = "--size", square: bool = False) -> tuple[int, int] | None:
    """``--size WxH`` → (W, H); ``None`` stays None (the model's or the server's default)."""
    if text is None:
        return None
    from ditstream.engine.errors import ValidationError
    from ditstream.engine.sizes import parse_size

    try:
        return parse_size(text, square=square)
    except ValidationError as exc:
        raise typer.BadParameter(exc.message, param_hint=param_hint) from exc


# -- engine options: one definition for serve, worker and generate (serve/worker: None = the env var or the
# default; generate: None = ModelConfig's default) ---------------------------------------------------------
Model = Annotated[str | None, typer.Option(
    help="'demo' (default), a diffusers folder, a hub id, or 'null' (echo engine; serve/worker only); "
         "serve/worker: env DITSTREAM_MODEL.")]
BackendName = Annotated[str | None, typer.Option(
    "--backend", help="torch (default) | compile | onnx | tensorrt | auto; serve/worker: env DITSTREAM_BACKEND.")]
Device = Annotated[str | None, typer.Option(
    help="auto (default) | cpu | cuda | cuda:N; serve/worker: env DITSTREAM_DEVICE.")]
Dtype = Annotated[str | None, typer.Option(
    help="auto (default) | float32 | bfloat16 | float16; serve/worker: env DITSTREAM_DTYPE.")]
Threads = Annotated[int | None, typer.Option(
    envvar="DITSTREAM_THREADS",
    help="torch CPU threads (default 1, 0 = one per core). More threads are slower on a shared CPU "
         "(docs/benchmarks.md).")]
NullDelayMs = Annotated[float | None, typer.Option(help="Null engine only: simulated inference time per tick.")]

# -- backend options: one definition, every command -------------------------------------------------
Resolutions = Annotated[list[str] | None, typer.Option(
    "--resolution", "-r", metavar="WxH",
    help="Size to build/serve, WIDTHxHEIGHT or N (repeatable; the first is the profile's opt). Default "
         "profile: 512 (256-1024). serve/worker: env DITSTREAM_RESOLUTIONS=512,768x512.")]
Batches = Annotated[list[int] | None, typer.Option(
    "--batch", "-b", metavar="N",
    help="Batch size to build/serve (repeatable; min/max bound the profile, the first is opt). Default 1-8. "
         "serve/worker: env DITSTREAM_BATCHES=1,4.")]
CacheDir = Annotated[str | None, typer.Option(
    "--cache-dir",
    help="Engine cache folder, where build-engine puts ONNX exports and TensorRT engines and the backends "
         "look for them (default ~/.cache/ditstream/engines; serve/worker: env DITSTREAM_CACHE_DIR).")]
TinyVae = Annotated[str | None, typer.Option(
    "--tiny-vae", metavar="PATH",
    help="TAESANA tiny autoencoder: a folder with taesana_encoder.* and/or taesana_decoder.* "
         "(.safetensors/.pth), or one decoder file. Replaces DC-AE on the sides given "
         "(serve/worker: env DITSTREAM_TINY_VAE).")]
OptLevel = Annotated[int | None, typer.Option(
    "--opt-level", min=0, max=5,
    help="TensorRT builder optimisation level (default 3; part of the engine's cache key; serve/worker: env "
         "DITSTREAM_OPT_LEVEL).")]

Loras = Annotated[list[str] | None, typer.Option(
    "--lora", metavar="NAME=PATH[:SCALE]",
    help="Load a LoRA adapter (diffusers/PEFT format; repeatable). PATH 'demo' = the demo model's shipped "
         "adapter NAME (e.g. swap=demo:0). SCALE (default 1) is what streams get unless they pick scales "
         "in 'loras'. Needs the torch backend (serve/worker: env DITSTREAM_LORAS=a=x.safetensors,b=demo:0).")]


def lora_specs(values: list[str] | None) -> tuple:  # -> tuple[engine.lora.LoraSpec, ...]
    """``--lora`` values → ``LoraSpec``s, checked now: a malformed one is a usage error (exit 2)."""
    from ditstream.engine.errors import ValidationError
    from ditstream.engine.lora import LoraSpec

    try:
        return tuple(LoraSpec.parse(v) for v in values or ())
    except ValidationError as exc:
        raise typer.BadParameter(exc.message, param_hint="--lora") from exc


#: ``BackendOptions`` field → the option that sets it (for usage errors).
_HINTS = {"resolution": "--resolution", "batch": "--batch", "cache_dir": "--cache-dir", "tiny_vae": "--tiny-vae",
          "opt_level": "--opt-level", "seq_len": "--seq-len"}


def parse_resolutions(values: list[str] | None) -> tuple[tuple[int, int], ...]:
    """``-r`` values → (width, height) pairs through the one size parser (``N`` means N×N)."""
    return tuple(size_arg(v, param_hint="--resolution", square=True) for v in values or ())  # type: ignore[misc]


def backend_options(resolution: list[str] | None = None, batch: list[int] | None = None, cache_dir: str | None = None,
                    tiny_vae: str | None = None, opt_level: int | None = None,
                    seq_len: int | None = None) -> BackendOptions:
    """The ``BackendOptions`` the shared options describe, checked now (before any model loads):
    a malformed value is a usage error (exit 2) naming the option."""
    from ditstream.engine.config import BackendOptions
    from ditstream.engine.errors import ValidationError

    try:
        return BackendOptions(resolutions=parse_resolutions(resolution), batches=tuple(batch or ()),
                              cache_dir=cache_dir, tiny_vae=tiny_vae, opt_level=opt_level,
                              seq_len=seq_len).validate()
    except ValidationError as exc:
        raise typer.BadParameter(exc.message, param_hint=_HINTS.get(exc.field or "", exc.field)) from exc


def backend_overrides(resolution: list[str] | None, batch: list[int] | None, cache_dir: str | None,
                      tiny_vae: str | None, opt_level: int | None) -> dict[str, object]:
    """The shared options as ``Settings`` overrides (serve, worker), checked first: a bad value is a
    usage error naming the option, before anything loads. Unset ones are left out (env applies)."""
    opts = backend_options(resolution, batch, cache_dir, tiny_vae, opt_level)
    return {k: v for k, v in dict(
        resolutions=[f"{w}x{h}" for w, h in opts.resolutions] or None, batches=list(opts.batches) or None,
        cache_dir=cache_dir, tiny_vae=tiny_vae, opt_level=opt_level).items() if v is not None}
