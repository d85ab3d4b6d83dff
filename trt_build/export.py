"""ONNX export of the transformer, VAE encoder and VAE decoder with dynamic batch/height/width.

Why the TorchScript exporter (``dynamo=False``): the dynamo exporter's default optimiser folds away
the ``+ 1e-15`` in the linear-attention denominator, which turns zero rows into NaN in onnxruntime
(ANCHORS.md). The TorchScript exporter keeps it and keeps diffusers' explicit fp32 casts around
linear attention and RMSNorm, which a strongly typed TensorRT build then honours.

Each network is wrapped in a small ``nn.Module`` with positional tensor inputs (no monkey-patching
of diffusers classes). Exports are written into a temporary folder and moved into place with one
``os.replace``, so a crash never leaves a folder that looks like a finished export.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ditstream.trt_build.specs import (
    COMPONENTS,
    DEFAULT_OPSET,
    DTYPE_NAMES,
    artifact_spec,
    component_dtype,
    component_module,
)
from torch import nn

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


class TransformerExport(nn.Module):
    """``(sample, timestep, encoder_hidden_states, encoder_attention_mask[, guidance]) -> output``.

    Shapes: sample (B, C, h, w) in the model dtype; timestep/guidance (B,) fp32;
    encoder_hidden_states (B, L, D) model dtype; encoder_attention_mask (B, L) int64.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.with_guidance = bool(getattr(transformer.config, "guidance_embeds", False))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            guidance=guidance if self.with_guidance else None,
            timestep=timestep,
            return_dict=False,
        )[0]


class VaeEncoderExport(nn.Module):
    """``images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, c, H/f, W/f)`` (no tiling)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


class VaeDecoderExport(nn.Module):
    """``unscaled latents (B, c, h, w) -> images (B, 3, h·f, w·f)`` in about [-1, 1] (no tiling)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)


@dataclass(frozen=True)
class ExportSpec:
    """Names, example inputs and dynamic axes for one component."""

    component: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


def _vae_scale(vae: Any) -> int:
    return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


def transformer_inputs(
    transformer: Any, batch: int, latent_h: int, latent_w: int, *, seq_len: int = 8,
    dtype: torch.dtype | None = None, device: torch.device | str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random example inputs in the layout ``TransformerExport`` takes (guidance last if used)."""
    dtype = dtype or next(transformer.parameters()).dtype
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, latent_h, latent_w, generator=g).to(device, dtype)
    timestep = torch.rand(batch, generator=g).to(device)
    ehs = torch.randn(batch, seq_len, cfg.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(batch, seq_len, dtype=torch.int64, device=device)
    if seq_len > 2:
        mask[:, -2:] = 0  # padded prompt tokens, so the mask path is exercised
    inputs: tuple[torch.Tensor, ...] = (sample, timestep, ehs, mask)
    if getattr(cfg, "guidance_embeds", False):
        inputs = (*inputs, torch.full((batch,), 4.5, device=device))
    return inputs


def make_export_spec(
    components: Any, component: str, *, batch: int = 1, height: int = 64, width: int = 64,
    seq_len: int = 8, dtype: torch.dtype | None = None,
) -> ExportSpec:
    """The wrapper module and example inputs for ``component`` at pixel size ``height × width``.

    DC-AE picks linear vs quadratic attention in Python from the feature-map size, so the traced
    branch is the one the example size takes: export at a size inside the profile (≥ 64 px for the
    real model) so that the linear branch — the one every real resolution uses — is the one kept.
    """
    transformer, vae = components.transformer, components.vae
    device = next(transformer.parameters()).device
    f = _vae_scale(vae)
    if height % f or width % f:
        raise ValueError(f"export size {height}x{width} must be a multiple of the VAE factor {f}")
    if component == "transformer":
        names = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
        inputs = transformer_inputs(transformer, batch, height // f, width // f, seq_len=seq_len,
                                    dtype=dtype, device=device)
        if len(inputs) == 5:
            names.append("guidance")
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "seq"}, "encoder_attention_mask": {0: "batch", 1: "seq"},
                "guidance": {0: "batch"}, "output": {0: "batch", 2: "height", 3: "width"}}
        return ExportSpec(component, TransformerExport(transformer).eval(), inputs, tuple(names), ("output",),
                          {k: v for k, v in axes.items() if k in names or k == "output"})
    vae_dtype = dtype or next(vae.parameters()).dtype
    if component == "vae_encoder":
        images = (torch.rand(batch, 3, height, width) * 2 - 1).to(device, vae_dtype)
        return ExportSpec(component, VaeEncoderExport(vae).eval(), (images,), ("images",), ("latents",),
                          {"images": {0: "batch", 2: "height", 3: "width"},
                           "latents": {0: "batch", 2: "lh", 3: "lw"}})
    if component == "vae_decoder":
        latents = torch.randn(batch, vae.config.latent_channels, height // f, width // f).to(device, vae_dtype)
        return ExportSpec(component, VaeDecoderExport(vae).eval(), (latents,), ("latents",), ("images",),
                          {"latents": {0: "batch", 2: "height", 3: "width"},
                           "images": {0: "batch", 2: "ih", 3: "iw"}})
    raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")


def export_module(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], out_dir: str | Path, *,
    input_names: Sequence[str], output_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` to ``out_dir/model.onnx`` atomically; returns the model path.

    Weights over 2 GB go to external data beside the model (both inside ``out_dir``). The folder
    appears only when the export finished; an existing ``out_dir`` is replaced.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization, TensorRT 10); got {opset}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                module, tuple(example_inputs), str(tmp / MODEL_FILE), dynamo=False, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        _fix_transpose_perms(tmp / MODEL_FILE)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s", type(module).__name__, out_dir / MODEL_FILE)
    return out_dir / MODEL_FILE


def _fix_transpose_perms(path: Path) -> None:
    """Rewrite negative ``Transpose`` perms (``movedim(-1, 1)``) as non-negative ones.

    The TorchScript exporter copies ``movedim``'s negative dims into ``perm`` verbatim; the ONNX spec
    (and onnxruntime, TensorRT) require ``0..rank-1``. Only the attribute is touched (no weights),
    so the model is loaded without its external data.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Transpose":
            continue
        for attr in node.attribute:
            if attr.name == "perm" and any(p < 0 for p in attr.ints):
                rank = len(attr.ints)
                fixed = [p + rank if p < 0 else p for p in attr.ints]
                del attr.ints[:]
                attr.ints.extend(fixed)
                changed += 1
    if changed:
        onnx.save(model, str(path))
        logger.debug("fixed %d negative Transpose perms in %s", changed, path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move finished folder ``src`` to ``dst``; an old ``dst`` is moved aside first, then removed."""
    from ditstream.trt_build.cache import unique_name

    old = None
    if dst.exists():
        old = unique_name(dst, "old")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_component(
    components: Any, component: str, out_dir: str | Path, *, batch: int = 1, height: int = 64,
    width: int = 64, seq_len: int = 8, dtype: torch.dtype | None = None, opset: int = DEFAULT_OPSET,
    clean: bool = True,
) -> Path:
    """Export one of ``COMPONENTS`` of a loaded pipeline; ``clean`` runs ``cleanup_onnx`` after."""
    spec = make_export_spec(components, component, batch=batch, height=height, width=width,
                            seq_len=seq_len, dtype=dtype)
    path = export_module(spec.module, spec.example_inputs, out_dir, input_names=spec.input_names,
                         output_names=spec.output_names, dynamic_axes=spec.dynamic_axes, opset=opset)
    if clean:
        cleanup_onnx(path)
    return path


def cleanup_onnx(path: str | Path) -> bool:
    """Fold constants and drop dead nodes with onnx-graphsurgeon when installed (optional).

    Returns whether a clean-up ran. Only structural clean-up: no arithmetic is re-associated, so
    the linear-attention epsilon is left alone (checked by ``has_linear_attention_eps``).
    """
    try:
        import onnx
        import onnx_graphsurgeon as gs
    except ImportError:
        logger.debug("onnx-graphsurgeon not installed; skipping graph clean-up")
        return False
    path = Path(path)
    from ditstream.trt_build.cache import unique_name

    model = onnx.load(str(path))
    if model.ByteSize() > 2**31 - 1 or any(init.data_location == onnx.TensorProto.EXTERNAL
                                            for init in model.graph.initializer):
        logger.info("skipping graph clean-up of %s (external data)", path)
        return False
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    tmp = unique_name(path)
    onnx.save(gs.export_onnx(graph), str(tmp))
    os.replace(tmp, path)
    return True


# ---------------------------------------------------------------------------------------------
# Checks on an exported graph (used by tests and by ``build-engine`` before a TensorRT build)
# ---------------------------------------------------------------------------------------------

def has_linear_attention_eps(model: Any, eps: float = 1e-15) -> bool:
    """Whether the graph still adds ``eps`` (a Constant or initializer equal to it) somewhere."""
    import numpy as np
    from onnx import numpy_helper

    def close(arr: Any) -> bool:
        arr = np.asarray(arr, dtype=np.float64)
        return arr.size == 1 and abs(float(arr.reshape(())) - eps) <= eps * 1e-3

    for init in model.graph.initializer:
        if close(numpy_helper.to_array(init)):
            return True
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and close(numpy_helper.to_array(attr.t)):
                    return True
    return False


def reduced_precision_islands(model: Any) -> dict[str, list[str]]:
    """Element types of the ops that must stay fp32 in a reduced-precision graph.

    Returns ``{"fp32": [...], "other": [...]}`` listing ``Pow`` (RMSNorm's x²), ``ReduceMean``
    fed by a ``Pow``, and ``Div`` nodes fed by an ``Add`` of the linear-attention epsilon, by the
    element type of their first input. A good reduced-precision export has ``other`` empty.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    producers = {out: node for node in inferred.graph.node for out in node.output}
    eps_names = _eps_value_names(inferred)
    watched: list[Any] = []
    for node in inferred.graph.node:
        if node.op_type == "Pow":
            watched.append(node)
        elif node.op_type == "ReduceMean" and getattr(producers.get(node.input[0]), "op_type", "") == "Pow":
            watched.append(node)
        elif node.op_type == "Div" and len(node.input) > 1:
            add = producers.get(node.input[1])
            if add is not None and add.op_type == "Add" and any(i in eps_names for i in add.input):
                watched.append(node)
    out: dict[str, list[str]] = {"fp32": [], "other": []}
    for node in watched:
        ok = types.get(node.input[0]) == onnx.TensorProto.FLOAT
        out["fp32" if ok else "other"].append(f"{node.op_type}:{node.name}")
    return out


def _eps_value_names(model: Any, limit: float = 1e-6) -> set[str]:
    """Names of scalar constants in (0, limit]: the epsilons of normalisations and attention."""
    import numpy as np
    from onnx import numpy_helper

    names: set[str] = set()

    def small(arr: Any) -> bool:
        arr = np.asarray(arr, dtype=np.float64)
        return arr.size == 1 and 0 < float(arr.reshape(())) <= limit

    for init in model.graph.initializer:
        if small(numpy_helper.to_array(init)):
            names.add(init.name)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and small(numpy_helper.to_array(attr.t)):
                    names.update(node.output)
    return names


# ---------------------------------------------------------------------------------------------
# Cached exports
# ---------------------------------------------------------------------------------------------

def onnx_build_spec(components: Any, component: str, *, opset: int = DEFAULT_OPSET,
                    weights: str | None = None) -> Any:
    """The cache spec of an ONNX export (``specs.artifact_spec``; the profile is not part of it)."""
    return artifact_spec(components, component, "onnx", opset=opset, weights=weights)


def get_or_export(components: Any, component: str, *, cache: Any = None, opset: int = DEFAULT_OPSET,
                  height: int | None = None, width: int | None = None, weights: str | None = None) -> Path:
    """Path of ``model.onnx`` for ``component``, exported now unless the cache already holds it."""
    from ditstream.trt_build.cache import EngineCache

    cache = cache if cache is not None else EngineCache()
    spec = artifact_spec(components, component, "onnx", opset=opset, weights=weights)
    f = _vae_scale(components.vae)
    # Big enough that DC-AE takes its linear-attention branch at every stage (see make_export_spec).
    size_h = height or max(64, 8 * f)
    size_w = width or max(64, 8 * f)
    # Under the cache's per-key lock: workers sharing a cache volume export once, the others hit.
    path, created = cache.get_or_create(
        spec, lambda tmp: export_component(components, component, tmp, height=size_h, width=size_w, opset=opset),
        suffix=".onnx", info={"export_size": [size_h, size_w]},
    )
    if not created:
        logger.info("onnx cache hit for %s: %s", component, path)
    return path / MODEL_FILE


__all__ = ["COMPONENTS", "DEFAULT_OPSET", "DTYPE_NAMES", "MODEL_FILE", "component_dtype", "component_module",
           "export_component", "get_or_export", "make_export_spec", "onnx_build_spec", "transformer_inputs"]
