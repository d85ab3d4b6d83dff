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


def trt_version() -> str:
    """Installed TensorRT version, or ``""`` when TensorRT is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        return ""
    return str(trt.__version__)


def compute_capability(device: int = 0) -> str:
    """``"major.minor"`` of the CUDA device (engines are tied to it), or ``""`` without CUDA."""
    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


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
                  device: int = 0) -> BuildSpec:
    """The cache spec (hence key) of one artifact of ``component``.

    ``kind="onnx"``: an export (dynamic shapes, so no profile; keyed on weights, dtype, opset, torch).
    ``kind="tensorrt"``: an engine (weights, dtype, ``profile``, builder flags, TensorRT, GPU).
    ``weights`` is a precomputed ``weights_hash`` of the component's module (hashing is not free).
    """
    weights = weights or weights_hash(component_module(components, component))
    dtype = DTYPE_NAMES[component_dtype(components, component)]
    if kind == "onnx":
        return BuildSpec(weights_hash=weights, component=component, dtype=dtype, profile=BuildProfile(),
                         kind="onnx", opset=opset, extra=(("torch", torch.__version__.split("+")[0]),))
    if kind == "tensorrt":
        if profile is None:
            raise ValueError("a TensorRT engine spec needs a build profile")
        return BuildSpec(weights_hash=weights, component=component, dtype=dtype, profile=profile, kind="tensorrt",
                         flags=(("strongly_typed", True), ("opt_level", opt_level)), trt_version=trt_version(),
                         compute_capability=compute_capability(device))
    raise ValueError(f"unknown artifact kind {kind!r}; choose one of {KINDS}")
