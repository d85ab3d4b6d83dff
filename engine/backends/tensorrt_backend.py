"""TensorRT backend: cached engines run on torch CUDA tensors, with CUDA graphs per exact shape.

Engines come from ``trt_build.build.get_or_build_engine`` (built on first use for the profile asked
for, then loaded from the cache keyed on weights, dtype, profile, TensorRT version and GPU). Inputs
and outputs are torch tensors whose device pointers are handed to TensorRT, and enqueueing happens
on torch's current stream, so no copies or host syncs are added.

CUDA graphs: TensorRT engines with dynamic shapes may be captured once the input shapes are fixed,
so each (component, shape) gets its own graph after one eager run; replays copy inputs into the
graph's static buffers. A shape outside the engine's profile is an error that names the profile —
never a silent fallback to torch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ditstream.engine.backends.base import Backend, BackendLimits
from ditstream.engine.errors import BackendUnavailableError, GenerationError
from ditstream.trt_build.cache import DEFAULT_BATCHES, DEFAULT_RESOLUTIONS

if TYPE_CHECKING:
    from ditstream.engine.config import BackendOptions

logger = logging.getLogger(__name__)

#: The default profile (``build-engine``'s too): any size from 256² to 1024², batch 1 to 8.
DEFAULT_BATCH_SIZES: tuple[int, ...] = DEFAULT_BATCHES
MAX_GRAPHS = 32


class _Runner:
    """One engine + execution context; runs on torch tensors, optionally through CUDA graphs."""

    def __init__(self, trt: Any, path: Path, device: torch.device, cuda_graphs: bool) -> None:
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not load engine {path}")
        self.context = self.engine.create_execution_context()
        self.device = device
        self.cuda_graphs = cuda_graphs
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.inputs}
        self.graphs: OrderedDict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor],
                                                         torch.Tensor]] = OrderedDict()
        self.seen: set[tuple[Any, ...]] = set()

    def check(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, tensor in feeds.items():
            lo, _, hi = self.profile[name]
            if any(d < a or d > b for d, a, b in zip(tensor.shape, lo, hi)):
                raise GenerationError(
                    f"input {name} of shape {tuple(tensor.shape)} is outside this TensorRT engine's profile "
                    f"(min {tuple(lo)}, max {tuple(hi)}); rebuild with `ditstream build-engine` for these sizes"
                )

    def _enqueue(self, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(self.outputs[0], out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise GenerationError("TensorRT execution failed")

    def __call__(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {n: t.to(self.device, self.dtypes[n]).contiguous() for n, t in feeds.items()}
        self.check(feeds)
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.outputs[0]))
        key = tuple((n, tuple(t.shape)) for n, t in sorted(feeds.items()))
        if not self.cuda_graphs:
            out = torch.empty(out_shape, dtype=self.dtypes[self.outputs[0]], device=self.device)
            self._enqueue(feeds, out)
            return out
        if key in self.graphs:
            graph, static_in, static_out = self.graphs[key]
            self.graphs.move_to_end(key)
            for name, tensor in feeds.items():
                static_in[name].copy_(tensor)
            graph.replay()
            return static_out.clone()
        out = torch.empty(out_shape, dtype=self.dtypes[self.outputs[0]], device=self.device)
        self._enqueue(feeds, out)
        if key in self.seen:  # second time this shape: capture it (the first run did the allocations)
            self._capture(key, feeds, out_shape)
        self.seen.add(key)
        return out

    def _capture(self, key: tuple[Any, ...], feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> None:
        static_in = {n: t.clone() for n, t in feeds.items()}
        static_out = torch.empty(out_shape, dtype=self.dtypes[self.outputs[0]], device=self.device)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._enqueue(static_in, static_out)  # one run on the capture stream before capturing
            with torch.cuda.graph(graph, stream=side):
                self._enqueue(static_in, static_out)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graphs[key] = (graph, static_in, static_out)
        if len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        logger.debug("captured CUDA graph for %s", key)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class TensorRTBackend(Backend):
    """Runs the three networks as TensorRT engines.

    ``options`` (``engine.config.BackendOptions``) decide the build profile and the cache, exactly as
    for ``ditstream build-engine`` (``trt_build.specs``): ``resolutions`` (width, height) and
    ``batches`` (min/opt/max; opt is the first of each; default ``DEFAULT_RESOLUTIONS`` and
    ``DEFAULT_BATCHES``), ``seq_len`` (the model's ``max_sequence_length``), ``opt_level``,
    ``cache_dir``, and ``build_deadline`` (``time.monotonic()``), which cancels engine builds still
    running after it (the time-boxed GPU bench). ``cuda_graphs`` captures one graph per exact shape
    after its first use.
    """

    name = "tensorrt"
    needs_warmup = True  # one CUDA graph per exact shape, captured on its second run

    def __init__(self, components: Any, options: BackendOptions | None = None, *, cuda_graphs: bool = True) -> None:
        super().__init__(components, options)
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailableError("backend 'tensorrt' needs the tensorrt package (pip install tensorrt)") \
                from exc
        if components.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError(f"backend 'tensorrt' needs a CUDA device; the model is on {components.device}")
        from ditstream.trt_build.build import DEFAULT_OPT_LEVEL, get_or_build_engine
        from ditstream.trt_build.cache import EngineCache
        from ditstream.trt_build.specs import build_profile

        self._trt = trt
        o = self.options
        self.cache = EngineCache(o.cache_dir)
        # The same profile build-engine computes from the same options: the same cache entry.
        self.profile = build_profile(components, o.resolutions, o.batches, seq_len=o.seq_len)
        self._sizes = o.resolutions or DEFAULT_RESOLUTIONS
        opt_level = o.opt_level if o.opt_level is not None else DEFAULT_OPT_LEVEL
        self.runners: dict[str, _Runner] = {}
        for component in ("transformer", "vae_encoder", "vae_decoder"):
            try:
                path = get_or_build_engine(components, component, self.profile, cache=self.cache,
                                           opt_level=opt_level, deadline=o.build_deadline)
            except Exception as exc:
                raise BackendUnavailableError(f"backend 'tensorrt' could not build {component}: {exc}") from exc
            self.runners[component] = _Runner(trt, path, components.device, cuda_graphs)
        self._with_guidance = "guidance" in self.runners["transformer"].inputs
        logger.info("tensorrt backend ready (TensorRT %s, %s)", trt.__version__, self.profile.describe())

    @property
    def limits(self) -> BackendLimits:
        """The build profile: every call must fit its batch, height and width ranges."""
        p = self.profile
        return BackendLimits(max_batch=p.batch[2], min_batch=p.batch[0], width=(p.width[0], p.width[2]),
                             height=(p.height[0], p.height[2]), sizes=self._sizes)

    def warmup(self, shapes: list[tuple[int, int, int]]) -> None:
        """Run each ``(batch, height, width)`` twice so its CUDA graphs are captured before serving."""
        from ditstream.trt_build.export import transformer_inputs

        f = self.components.vae_scale_factor
        for batch, height, width in shapes:
            if not self.profile.covers(batch, height, width):
                raise GenerationError(f"shape batch={batch} {width}x{height} is outside the engine profile "
                                      f"({self.profile.describe()})")
            x, t, ehs, mask, *g = transformer_inputs(self.components.transformer, batch, height // f, width // f,
                                                     seq_len=self.profile.seq_len[1], device=self.device)
            images = torch.zeros(batch, 3, height, width, device=self.device)
            for _ in range(2):
                self.denoise(x, t, ehs, mask, g[0] if g else None)
                self.decode(self.encode(images))
        torch.cuda.synchronize(self.device)

    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        batch = x.shape[0]
        feeds = {"sample": x, "timestep": _per_sample(timestep, batch, x.device),
                 "encoder_hidden_states": encoder_hidden_states, "encoder_attention_mask": encoder_attention_mask}
        if self._with_guidance:
            if guidance is None:
                raise ValueError("this transformer embeds guidance; pass a guidance tensor")
            feeds["guidance"] = _per_sample(guidance, batch, x.device)
        return self.runners["transformer"](feeds).to(self.dtype)

    def encode(self, images):
        return self.runners["vae_encoder"]({"images": images})

    def decode(self, latents):
        return self.runners["vae_decoder"]({"latents": latents})


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.expand(batch).contiguous() if t.ndim == 0 else t.reshape(batch)
