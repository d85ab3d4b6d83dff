"""TensorRT engine build: strongly typed network, min/opt/max profiles, timing cache, progress.

Why strongly typed: precision then comes from the ONNX graph itself. The graph is exported in the
target dtype, and diffusers' explicit fp32 casts around linear attention and RMSNorm survive the
TorchScript exporter (``export.reduced_precision_islands`` checks it before every reduced-precision
build), so those sub-graphs stay fp32 — fp16 would underflow the 1e-15 epsilon and overflow the
sums and x². A weakly typed fp16 build is free to ignore such casts, which is why we never set
``BuilderFlag.FP16``.

``tensorrt`` is imported inside the functions; this module is importable (and its pure parts are
tested) without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ditstream.trt_build.cache import BuildProfile, BuildSpec, EngineCache, unique_name, write_atomic
from ditstream.trt_build.export import MODEL_FILE, get_or_export
from ditstream.trt_build.specs import (
    COMPONENTS,
    DEFAULT_OPT_LEVEL,
    TRT_MAJOR,
    artifact_spec,
    compute_capability,
    trt_install_hint,
    trt_version,
)

logger = logging.getLogger(__name__)

#: The real DC-AE takes its quadratic-attention branch below 192 px (see ``export.make_export_spec``);
#: the graph is traced on the linear branch, so smaller profiles would compute something else.
MIN_PIXELS_REAL_DCAE = 192


def input_profiles(components: Any, component: str, profile: BuildProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input name: (min shape, opt shape, max shape)}`` of ``component`` for ``profile`` (pixels)."""
    f = components.vae_scale_factor
    b, h, w, s = profile.batch, profile.height, profile.width, profile.seq_len
    for dim, rng in (("height", h), ("width", w)):
        if any(v % f for v in rng):
            raise ValueError(f"profile {dim} {rng} must be multiples of the VAE factor {f}")
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def three(fn: Any) -> tuple[tuple[int, ...], ...]:
        return tuple(fn(i) for i in range(3))

    if component == "transformer":
        cfg = components.transformer.config
        shapes["sample"] = three(lambda i: (b[i], cfg.in_channels, h[i] // f, w[i] // f))
        shapes["timestep"] = three(lambda i: (b[i],))
        shapes["encoder_hidden_states"] = three(lambda i: (b[i], s[i], cfg.caption_channels))
        shapes["encoder_attention_mask"] = three(lambda i: (b[i], s[i]))
        if getattr(cfg, "guidance_embeds", False):
            shapes["guidance"] = three(lambda i: (b[i],))
    elif component == "vae_encoder":
        shapes["images"] = three(lambda i: (b[i], 3, h[i], w[i]))
    elif component == "vae_decoder":
        c = components.vae.config.latent_channels
        shapes["latents"] = three(lambda i: (b[i], c, h[i] // f, w[i] // f))
    else:
        raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")
    return shapes


def engine_spec(components: Any, component: str, profile: BuildProfile, *, opt_level: int = DEFAULT_OPT_LEVEL,
                weights: str | None = None, device: Any = None) -> BuildSpec:
    """The cache spec of a TensorRT engine (``specs.artifact_spec``): weights, dtype, profile, flags, TRT, GPU."""
    return artifact_spec(components, component, "tensorrt", profile, opt_level=opt_level, weights=weights,
                         device=device)


def cast_resize_to_fp32(model: Any) -> int:
    """Wrap every bf16 ``Resize`` in Cast(fp32) → Resize → Cast(bf16); returns how many.

    TensorRT has no bf16 Resize, and DC-AE's "interpolate" upsampler is one (ANCHORS.md). Works in
    place on an ``onnx.ModelProto``; the result computes the same values (nearest/linear resize of
    bf16 values is exact in fp32).
    """
    import onnx
    from onnx import TensorProto, helper

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    new_nodes: list[Any] = []
    count = 0
    for node in model.graph.node:
        if node.op_type == "Resize" and types.get(node.input[0]) == TensorProto.BFLOAT16:
            count += 1
            src, dst = node.input[0], node.output[0]
            cast_in, resized = f"{src}__fp32_{count}", f"{dst}__fp32_{count}"
            new_nodes.append(helper.make_node("Cast", [src], [cast_in], to=TensorProto.FLOAT,
                                              name=f"{node.name}/cast_in"))
            node.input[0] = cast_in
            node.output[0] = resized
            new_nodes.append(node)
            new_nodes.append(helper.make_node("Cast", [resized], [dst], to=TensorProto.BFLOAT16,
                                              name=f"{node.name}/cast_out"))
        else:
            new_nodes.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    return count


def prepare_onnx_for_trt(onnx_path: Path, dtype: str, cache: EngineCache | None = None) -> Path:
    """Check the fp32 islands of a reduced-precision graph and patch bf16 Resizes; returns the path.

    Raises ``RuntimeError`` if an RMSNorm x² or a linear-attention division is not fp32 — building
    such a graph would produce NaN/inf images, so we refuse instead. The patched graph is written
    beside the export (``model.trt.onnx``) under ``cache``'s lock for that export, through a unique
    temporary; once there it is reused (the export folder never changes under its key).
    """
    import onnx
    from ditstream.trt_build.export import reduced_precision_islands

    if dtype == "fp32":
        return onnx_path
    model = onnx.load(str(onnx_path), load_external_data=False)
    islands = reduced_precision_islands(model)
    if islands["other"]:
        raise RuntimeError(f"{dtype} graph {onnx_path} has reduced-precision ops that must be fp32: "
                           f"{islands['other'][:5]}")
    if dtype == "bf16":
        patched = onnx_path.with_name("model.trt.onnx")
        lock = cache.lock(onnx_path.parent.name) if cache is not None else contextlib.nullcontext()
        with lock:
            if patched.is_file():
                return patched
            model = onnx.load(str(onnx_path))
            if cast_resize_to_fp32(model):
                tmp = unique_name(patched)
                big = model.ByteSize() > 2**31 - 1
                # External data is written first, under the lock; the model file lands last.
                onnx.save(model, str(tmp), save_as_external_data=big, location=patched.name + ".data")
                os.replace(tmp, patched)
                return patched
    return onnx_path


def _timing_cache_path(cache: EngineCache, spec: BuildSpec) -> Path:
    gpu = "".join(c if c.isalnum() else "-" for c in spec.gpu).strip("-").lower() or "gpu"
    flavour = f"-{spec.trt_flavour}" if spec.trt_flavour else ""
    return cache.root / f"timing-trt{spec.trt_version}{flavour}-sm{spec.compute_capability}-{gpu}.cache"


def load_timing_cache(trt: Any, config: Any, path: Path | None) -> Any:
    """A timing cache object for ``config``: ``path``'s tactics when TensorRT accepts them, else empty.

    ``set_timing_cache`` returns False for a cache from another TensorRT or GPU; then the build
    starts from an empty cache (logged) and ``save_timing_cache`` will not overwrite the file.
    """
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache_obj = config.create_timing_cache(blob)
    if cache_obj is not None and config.set_timing_cache(cache_obj, ignore_mismatch=False):
        return cache_obj
    logger.warning("timing cache %s does not match this TensorRT/GPU; building without it", path)
    cache_obj = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache_obj, ignore_mismatch=False):
        logger.warning("TensorRT refused an empty timing cache; building without one")
        return None
    return cache_obj


def save_timing_cache(trt: Any, config: Any, cache_obj: Any, path: Path, lock: Any) -> bool:
    """Merge ``cache_obj`` into the timing cache at ``path`` (under ``lock``): never clobber it.

    Another worker may have saved tactics meanwhile: the file is read again under the lock, ours is
    combined into it, and the union is written through a unique temporary. A file TensorRT cannot
    combine with (another version or GPU) is left as it is. Returns whether anything was written.
    """
    with lock:
        merged = cache_obj
        if path.is_file():
            current = config.create_timing_cache(path.read_bytes())
            if current is None or not current.combine(cache_obj, False):
                logger.warning("timing cache %s does not combine with this build's; left unchanged", path)
                return False
            merged = current
        write_atomic(path, bytes(memoryview(merged.serialize())))
    return True


def check_trt_major(trt: Any) -> None:
    """Refuse a TensorRT this code was not written for, naming the package to install instead."""
    major = int(str(trt.__version__).split(".")[0])
    if major != TRT_MAJOR:
        raise RuntimeError(f"TensorRT {trt.__version__} is installed; ditstream supports TensorRT {TRT_MAJOR} "
                           f"(strongly typed builds): {trt_install_hint()}")


def build_engine_bytes(onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]], *,
                       opt_level: int = DEFAULT_OPT_LEVEL, timing_cache: Path | None = None,
                       workspace_gb: float | None = None, progress: bool = True,
                       deadline: float | None = None, cache: EngineCache | None = None) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine.

    ``deadline`` (a ``time.monotonic()`` value) cancels the build through the progress monitor once
    passed; the build then raises and no engine is cached. The tactics timed so far are merged into
    ``timing_cache`` whether the build finished, failed or was cancelled (under ``cache``'s lock).
    """
    import tensorrt as trt

    check_trt_major(trt)

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_obj = load_timing_cache(trt, config, timing_cache) if timing_cache is not None else None
    if (progress or deadline is not None) and hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt, deadline)
    started = time.monotonic()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:  # a cancelled build's tactics still make the next try faster
        if cache_obj is not None and timing_cache is not None:
            lock = cache.lock(timing_cache.name) if cache is not None else contextlib.nullcontext()
            try:
                save_timing_cache(trt, config, cache_obj, timing_cache, lock)
            except Exception as exc:  # never lose the build over its timing cache
                logger.warning("could not save the timing cache %s: %s", timing_cache, exc)
    if serialized is None:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"TensorRT build of {onnx_path} cancelled: time budget spent")
        raise RuntimeError(f"TensorRT build of {onnx_path} failed (see the TensorRT log above)")
    logger.info("built %s in %.1f s", onnx_path, time.monotonic() - started)
    return bytes(memoryview(serialized))


def _progress_monitor(trt: Any, deadline: float | None = None) -> Any:
    """A TensorRT progress monitor that logs each phase (steps at DEBUG) and cancels after ``deadline``."""

    class _Progress(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._started[phase_name] = time.monotonic()
            if parent_phase is None:
                logger.info("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            logger.debug("TensorRT: %s step %d", phase_name, step)
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("TensorRT: cancelling the build (time budget spent)")
                return False  # cancels the build
            return True

        def phase_finish(self, phase_name: str) -> None:
            took = time.monotonic() - self._started.pop(phase_name, time.monotonic())
            logger.debug("TensorRT: %s done in %.1f s", phase_name, took)

    return _Progress()


def get_or_build_engine(components: Any, component: str, profile: BuildProfile, *,
                        cache: EngineCache | None = None, opt_level: int = DEFAULT_OPT_LEVEL,
                        progress: bool = True, force: bool = False, deadline: float | None = None) -> Path:
    """The engine file for ``component`` at ``profile``: from the cache, or exported and built now.

    Built on the components' CUDA device (``torch.cuda.device`` guard) and keyed on it. The ONNX
    export is cached too, so a build interrupted after the export resumes at the build; the timing
    cache makes a re-run of an interrupted build much faster. Workers sharing the cache folder build
    one engine per key (``EngineCache.get_or_create``'s lock); the others wait and load it.
    """
    import torch

    cache = cache if cache is not None else EngineCache()
    spec = artifact_spec(components, component, "tensorrt", profile, opt_level=opt_level)
    if not spec.trt_version:
        raise RuntimeError(f"TensorRT is not installed: {trt_install_hint()}")
    if not spec.compute_capability:
        raise RuntimeError("building a TensorRT engine needs a CUDA GPU")
    if not force:
        hit = cache.lookup(spec)
        if hit is not None:
            logger.info("engine cache hit for %s: %s", component, hit.name)
            return hit
    device = getattr(components, "device", None)
    guard = (torch.cuda.device(device) if isinstance(device, torch.device) and device.type == "cuda"
             else contextlib.nullcontext())
    shapes = input_profiles(components, component, profile)
    onnx_path = get_or_export(components, component, cache=cache, weights=spec.weights_hash)
    onnx_path = prepare_onnx_for_trt(onnx_path, spec.dtype, cache)
    info = {"onnx": str(onnx_path), "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}

    def build(tmp: Path) -> None:
        logger.info("building TensorRT engine for %s (%s, %s)", component, spec.dtype, profile.describe())
        with guard:
            data = build_engine_bytes(onnx_path, shapes, opt_level=opt_level,
                                      timing_cache=_timing_cache_path(cache, spec), progress=progress,
                                      deadline=deadline, cache=cache)
        tmp.write_bytes(data)

    if force:
        with cache.lock(spec.key()):
            return cache.store_with(spec, build, info=info)
    path, created = cache.get_or_create(spec, build, info=info)
    if not created:
        logger.info("engine cache hit for %s: %s", component, path.name)
    return path


__all__ = ["DEFAULT_OPT_LEVEL", "MODEL_FILE", "build_engine_bytes", "cast_resize_to_fp32", "check_trt_major",
           "compute_capability", "engine_spec", "get_or_build_engine", "input_profiles", "load_timing_cache",
           "prepare_onnx_for_trt", "save_timing_cache", "trt_version"]
