"""The one place a cache key is computed: the build profile asked for, and each artifact's spec.

``ditstream build-engine`` and the ``onnx``/``tensorrt`` backends both turn their options into a
profile with ``build_profile`` and reach the cache through ``get_or_export``/``get_or_build_engine``,
which key every artifact with ``artifact_spec``. So the same model (weights hash), profile and
options give the same ``BuildSpec`` — and the same cache entry — whichever of them asks first; an
engine ``build-engine`` made ahead of time is the one ``serve`` and ``worker`` load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from ditstream.trt_build.cache import (
    DEFAULT_BATCHES,
    DEFAULT_RESOLUTIONS,
    BuildProfile,
    BuildSpec,
    weights_hash,
)

COMPONENTS: tuple[str, ...] = ("transformer", "vae_encoder", "vae_decoder")
#: TensorRT 10 and onnxruntime both read opset 17 (LayerNormalization is a single op from 17 on).
DEFAULT_OPSET = 17
DEFAULT_OPT_LEVEL = 3
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KINDS = ("onnx", "tensorrt")


#: Bump when ``export.py`` changes the graph it writes (wrappers, patches, opset handling): every
#: export and every engine built from one then misses the cache instead of reusing a stale graph.
EXPORT_REVISION = 2
#: The TensorRT major this code is written for (``build.py``: strongly typed networks, no FP16/BF16
#: builder flags; TensorRT 11 changes both). The ``tensorrt`` extra pins it.
TRT_MAJOR = 10
#: What to install for it: the pip package of the CUDA major torch was built for.
TRT_PACKAGES = {"12": "tensorrt-cu12>=10.7,<11", "13": "tensorrt-cu13>=10.13,<11"}


def trt_install_hint() -> str:
    """The exact ``pip install`` that gives TensorRT matching this torch's CUDA major."""
    cuda = (torch.version.cuda or "12").split(".")[0]
    return f"pip install '{TRT_PACKAGES.get(cuda, TRT_PACKAGES['12'])}'"


def trt_version() -> str:
    """Installed TensorRT version, or ``""`` when TensorRT is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        return ""
    return str(trt.__version__)


def trt_flavour() -> str:
    """The installed TensorRT wheel's CUDA flavour (``"cu12"``, ``"cu13"``), or ``""`` when unknown.

    The same TensorRT version is published for several CUDA majors and their engines are not
    interchangeable; NGC images install a plain ``tensorrt`` wheel, which is read as its libs' flavour.
    """
    from importlib import metadata

    for flavour in ("cu13", "cu12", "cu11"):
        for dist in (f"tensorrt-{flavour}-libs", f"tensorrt-{flavour}", f"tensorrt_{flavour}_libs"):
            try:
                metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            return flavour
    return ""


def _device_index(device: Any = None) -> int:
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    return device.index if device.index is not None else torch.cuda.current_device()


def compute_capability(device: Any = None) -> str:
    """``"major.minor"`` of the CUDA ``device`` (index, ``torch.device`` or ``"cuda:1"``; default the
    current one), or ``""`` without CUDA. Engines are tied to it."""
    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability(_device_index(device))
    return f"{major}.{minor}"


def gpu_name(device: Any = None) -> str:
    """The CUDA device's name (H100 SXM, H100 PCIe and H200 are all SM 9.0), or ``""`` without CUDA."""
    if not torch.cuda.is_available():
        return ""
    return str(torch.cuda.get_device_name(_device_index(device)))


def exporter_versions() -> tuple[tuple[str, str], ...]:
    """What decides the exported graph: torch (the exporter), onnx, diffusers (the modules traced)
    and ``EXPORT_REVISION`` (our wrappers). Part of every ONNX and engine key."""
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return ""

    return (("torch", torch.__version__.split("+")[0]), ("onnx", version("onnx")),
            ("diffusers", version("diffusers")), ("export_revision", str(EXPORT_REVISION)))


def component_module(components: Any, component: str) -> torch.nn.Module:
    """The module whose weights define ``component`` (the whole VAE for its encoder and decoder)."""
    if component == "transformer":
        return components.transformer
    if component in ("vae_encoder", "vae_decoder"):
        return components.vae
    raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")


def component_dtype(components: Any, component: str) -> torch.dtype:
    return next(component_module(components, component).parameters()).dtype


def build_profile(components: Any, resolutions: Iterable[tuple[int, int]] = (), batches: Iterable[int] = (), *,
                  seq_len: int | None = None) -> BuildProfile:
    """The profile for ``(width, height)`` sizes and batch sizes; empty = ``DEFAULT_RESOLUTIONS`` /
    ``DEFAULT_BATCHES``; ``seq_len`` defaults to the model's ``max_sequence_length`` (the prompt cache
    pads every prompt to it, so it is the one length the transformer sees)."""
    res = list(resolutions) or list(DEFAULT_RESOLUTIONS)
    bs = list(batches) or list(DEFAULT_BATCHES)
    seq = seq_len or int(getattr(components, "max_sequence_length", 300) or 300)
    return BuildProfile.from_request(res, bs, seq_len=seq)


def artifact_spec(components: Any, component: str, kind: str, profile: BuildProfile | None = None, *,
                  opt_level: int = DEFAULT_OPT_LEVEL, opset: int = DEFAULT_OPSET, weights: str | None = None,
                  device: Any = None) -> BuildSpec:
    """The cache spec (hence key) of one artifact of ``component``.

    ``kind="onnx"``: an export (dynamic shapes, so no profile; keyed on weights, dtype, opset and the
    exporter versions). ``kind="tensorrt"``: an engine (the same, plus ``profile``, builder flags,
    TensorRT version and CUDA flavour, and the GPU: compute capability and name). ``device`` is the
    GPU the engine is for (default: the components' device). ``weights`` is a precomputed
    ``weights_hash`` of the component's module (hashing is not free).
    """
    weights = weights or weights_hash(component_module(components, component))
    dtype = DTYPE_NAMES[component_dtype(components, component)]
    if kind == "onnx":
        return BuildSpec(weights_hash=weights, component=component, dtype=dtype, profile=BuildProfile(),
                         kind="onnx", opset=opset, extra=exporter_versions())
    if kind == "tensorrt":
        if profile is None:
            raise ValueError("a TensorRT engine spec needs a build profile")
        if device is None:
            device = getattr(components, "device", None)
        return BuildSpec(weights_hash=weights, component=component, dtype=dtype, profile=profile, kind="tensorrt",
                         flags=(("strongly_typed", True), ("opt_level", opt_level)), trt_version=trt_version(),
                         compute_capability=compute_capability(device), gpu=gpu_name(device),
                         trt_flavour=trt_flavour(), opset=opset, extra=exporter_versions())
    raise ValueError(f"unknown artifact kind {kind!r}; choose one of {KINDS}")
