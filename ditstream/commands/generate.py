"""``ditstream generate``: one image, txt2img or img2img, written to a file.

Its engine and backend options are the ones ``serve`` and ``worker`` take (``_args``: one definition
each); unset, they are ``ModelConfig``'s defaults."""

from __future__ import annotations

from pathlib import Path

import typer

from ditstream.commands._args import (
    BackendName,
    Batches,
    CacheDir,
    Device,
    Dtype,
    Loras,
    Model,
    OptLevel,
    Resolutions,
    Threads,
    TinyVae,
    backend_options,
    lora_specs,
    size_arg,
)

#: What ``generate --out`` can write, by extension (PIL's format names; .npy is the float array).
OUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".npy": "NPY"}


def _check_out(out: Path) -> str:
    fmt = OUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise typer.BadParameter(f"cannot write {out.suffix or 'a file without extension'!r}; use one of "
                                 f"{', '.join(OUT_FORMATS)}", param_hint="--out")
    return fmt


def _read_image(image: Path):  # -> np.ndarray (H, W, 3) uint8
    """Decode --image before the model loads (it takes a while), through the one decode helper: the
    header is checked against the pixel limit before any pixel is decoded (decompression bombs)."""
    from ditstream.engine.errors import ImageDecodeError
    from ditstream.engine.generate import MAX_PIXELS
    from ditstream.engine.imagefile import decode as decode_image

    if not image.is_file():
        raise typer.BadParameter(f"{str(image)!r} does not exist or is not a file", param_hint="--image")
    try:
        return decode_image(image.read_bytes(), max_pixels=MAX_PIXELS)
    except ImageDecodeError as exc:
        raise typer.BadParameter(f"cannot read {str(image)!r}: {exc.message}", param_hint="--image") from exc


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw."),
    out: Path = typer.Option(Path("out.png"), "--out", "-o",
                             help="Output file: PNG/JPEG/WebP, or .npy for the float32 [0,1] array before rounding."),
    image: Path | None = typer.Option(None, "--image", "-i", help="Input image for img2img (omit for txt2img)."),
    strength: float | None = typer.Option(None, help="img2img strength in (0, 1]: entry angle = strength·π/2."),
    steps: int | None = typer.Option(None, help="Model calls per image, 1-4."),
    seed: int = typer.Option(0, help="Noise seed (same seed, same image)."),
    size: str | None = typer.Option(None, help="WxH; default: the model's native size."),
    guidance_scale: float | None = typer.Option(None, help="Distilled guidance embedding scale."),
    model: Model = None,
    backend: BackendName = None,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    resolution: Resolutions = None,
    batch: Batches = None,
    cache_dir: CacheDir = None,
    tiny_vae: TinyVae = None,
    opt_level: OptLevel = None,
    lora: Loras = None,
) -> None:
    """Make one image (txt2img, or img2img with --image)."""
    fmt = _check_out(out)
    wh_arg = size_arg(size)
    options = backend_options(resolution, batch, cache_dir, tiny_vae, opt_level)
    loras = lora_specs(lora)
    pixels = _read_image(image) if image is not None else None

    import numpy as np
    from PIL import Image

    from ditstream.engine.config import ModelConfig, StreamConfig
    from ditstream.engine.errors import DitstreamError
    from ditstream.engine.generate import Generator
    from ditstream.engine.threads import set_torch_threads

    set_torch_threads(threads)
    try:
        given = {k: v for k, v in dict(model=model, backend=backend, device=device, dtype=dtype).items() if v is not None}
        gen = Generator.from_config(ModelConfig(**given, backend_options=options, loras=loras))
        d = gen.components.defaults or {}
        wh = wh_arg or (int(d.get("width", 512)), int(d.get("height", 512)))
        cfg = StreamConfig(
            prompt=prompt, mode="img2img" if image else "txt2img", seed=seed, width=wh[0], height=wh[1],
            steps=steps or int(d.get("steps", 1)), strength=strength or float(d.get("strength", 0.6)),
            guidance_scale=guidance_scale if guidance_scale is not None else float(d.get("guidance_scale", 4.5)),
        )
        arr = None
        if pixels is not None:
            pil = Image.fromarray(pixels)
            if pil.size != wh:
                typer.echo(f"resizing input {pil.size[0]}x{pil.size[1]} to {wh[0]}x{wh[1]}", err=True)
                pil = pil.resize(wh, Image.Resampling.BICUBIC)
            arr = np.asarray(pil, dtype=np.uint8)
        unit = gen.generate_unit(cfg, arr).numpy()
    except DitstreamError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "NPY":
        np.save(out, unit)
    else:
        from ditstream.engine.images import to_uint8

        Image.fromarray(to_uint8(unit)).save(out, format=fmt)
    typer.echo(f"wrote {out} ({cfg.width}x{cfg.height}, {cfg.mode}, {cfg.steps} step(s), seed {cfg.seed})")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("generate")(generate)
