"""TensorRT backend: cached engines run on torch CUDA tensors, with CUDA graphs per exact shape.

Engines come from ``trt_build.build.get_or_build_engine`` (built on first use for the profile asked
for, then loaded from the cache keyed on weights, dtype, profile, TensorRT version and flavour, and
the GPU's capability and name). Inputs and outputs are torch tensors whose device pointers are handed
to TensorRT; no copies or host syncs are added.

What keeps the first GPU run safe:

* **Own stream.** Everything is enqueued on the backend's own CUDA stream, never the legacy default
  stream (where TensorRT warns and synchronises every call); the caller's stream waits on it.
* **One execution context per captured shape.** A CUDA graph is bound to the context state (shapes,
  addresses) it was captured with, so each captured shape owns its context and static buffers;
  replaying shape A after capturing B is safe. Uncaptured shapes run eagerly on one more context.
* **One scratch buffer.** Every context of the three engines shares one device-memory block sized for
  the largest of them (``USER_MANAGED`` allocation): they all run in order on the one stream, so
  holding three (or 3 × 32) blocks sized for 1024² × batch 8 would only waste memory.
* **Capture during warm-up only,** in thread-local capture mode: a CUDA call from another thread
  (a codec, the HTTP loop) cannot invalidate it. The runner warms on the engine thread before
  serving (``Backend.warmup``); a shape that was not warmed runs eagerly, never captured mid-serve.
* **Device guard.** Loading and every call run under ``torch.cuda.device(<the model's device>)``, so
  ``--device cuda:1`` deserialises, allocates and runs on GPU 1.
* **Aligned addresses.** ``set_tensor_address`` needs 256-byte aligned pointers; a contiguous view
  (a row slice of a batch) can start anywhere, so such an input is copied into an aligned buffer
  first (``aligned_for_trt``), and a misaligned address reaching TensorRT is refused, never bound.

A shape outside the engine's profile is an error that names the profile — never a silent fallback.
"""

from __future__ import annotations

import logging
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
#: At most this many shapes per engine get a CUDA graph (and their own context); the rest run eagerly.
MAX_GRAPHS = 32
#: TensorRT's alignment for every I/O address (IExecutionContext.set_tensor_address).
TRT_ALIGNMENT = 256


def aligned_for_trt(tensor: torch.Tensor, alignment: int = TRT_ALIGNMENT) -> torch.Tensor:
    """``tensor`` itself when its address is aligned, else a copy in an aligned buffer.

    Why: torch's allocator aligns fresh blocks (512 bytes on CUDA), but a view into one, such as
    ``batch[1:]``, starts ``storage_offset * itemsize`` bytes in, and TensorRT reads a misaligned
    input wrongly or fails. The copy is carved out of a slightly larger byte buffer, so it is
    aligned on any device and allocator.
    """
    if not tensor.is_contiguous():
        raise ValueError("aligned_for_trt needs a contiguous tensor")
    if tensor.numel() == 0 or tensor.data_ptr() % alignment == 0:
        return tensor
    nbytes = tensor.numel() * tensor.element_size()
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, device=tensor.device)
    start = -raw.data_ptr() % alignment
    out = raw[start:start + nbytes].view(tensor.dtype).view(tensor.shape)
    return out.copy_(tensor)


def _address(name: str, tensor: torch.Tensor) -> int:
    """The pointer TensorRT is given for ``name``; a misaligned one is an error, never bound."""
    ptr = tensor.data_ptr()
    if ptr % TRT_ALIGNMENT and tensor.numel():
        raise GenerationError(f"TensorRT tensor {name} at address {ptr:#x} is not {TRT_ALIGNMENT}-byte aligned "
                              f"(a view into another tensor?): pass it through aligned_for_trt")
    return ptr


class _Scratch:
    """One device-memory block shared by every execution context that runs on one stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.size = 0
        self.buffer: torch.Tensor | None = None

    def reserve(self, nbytes: int) -> None:
        if self.buffer is not None and nbytes > self.buffer.numel():
            raise RuntimeError("scratch memory grew after contexts were bound to it")
        self.size = max(self.size, int(nbytes))

    def pointer(self) -> tuple[int, int]:
        if self.buffer is None:
            self.buffer = torch.empty(max(self.size, 256), dtype=torch.uint8, device=self.device)
            logger.info("TensorRT scratch memory: %.1f MiB shared by all contexts", self.size / 2**20)
        return self.buffer.data_ptr(), self.buffer.numel()


class _Graph:
    """A captured shape: its own execution context, static inputs and output, and the graph."""

    def __init__(self, context: Any, graph: torch.cuda.CUDAGraph, static_in: dict[str, torch.Tensor],
                 static_out: torch.Tensor) -> None:
        self.context, self.graph, self.static_in, self.static_out = context, graph, static_in, static_out


class _Runner:
    """One engine; runs on torch tensors on ``stream``, through CUDA graphs for the shapes warmed."""

    def __init__(self, trt: Any, path: Path, device: torch.device, cuda_graphs: bool, *,
                 stream: torch.cuda.Stream | None = None, scratch: _Scratch | None = None) -> None:
        self.trt = trt
        self.device = device
        self.cuda_graphs = cuda_graphs
        #: Set by ``TensorRTBackend.warmup``: only then may a new shape be captured.
        self.capture_enabled = False
        with torch.cuda.device(device):
            self.stream = stream if stream is not None else torch.cuda.Stream(device)
            self.scratch = scratch if scratch is not None else _Scratch(device)
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not load engine {path}")
        self._runtime = runtime  # the engine must not outlive its runtime
        size = getattr(self.engine, "device_memory_size_v2", None)
        self.scratch.reserve(size if size is not None else self.engine.device_memory_size)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.inputs}
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self._eager: Any = None

    def new_context(self) -> Any:
        """An execution context on the shared scratch memory (nothing allocated per context)."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        with torch.cuda.device(self.device):
            if strategy is not None:
                context = self.engine.create_execution_context(strategy.USER_MANAGED)
            else:
                context = self.engine.create_execution_context_without_device_memory()
            if context is None:
                raise GenerationError("TensorRT could not create an execution context (out of GPU memory?)")
            ptr, size = self.scratch.pointer()
            if hasattr(context, "set_device_memory"):
                context.set_device_memory(ptr, size)
            else:
                context.device_memory = ptr
        return context

    @property
    def eager(self) -> Any:
        if self._eager is None:
            self._eager = self.new_context()
        return self._eager

    def check(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, tensor in feeds.items():
            lo, _, hi = self.profile[name]
            if len(tensor.shape) != len(lo) or any(d < a or d > b for d, a, b in zip(tensor.shape, lo, hi)):
                raise GenerationError(
                    f"input {name} of shape {tuple(tensor.shape)} is outside this TensorRT engine's profile "
                    f"(min {tuple(lo)}, max {tuple(hi)}); rebuild with `ditstream build-engine` for these sizes"
                )

    def prepare(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each input on this engine's device, in its dtype, contiguous and 256-byte aligned."""
        return {n: aligned_for_trt(t.to(self.device, self.dtypes[n]).contiguous()) for n, t in feeds.items()}

    def _bind(self, context: Any, feeds: dict[str, torch.Tensor]) -> tuple[int, ...]:
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, _address(name, tensor))
        return tuple(context.get_tensor_shape(self.outputs[0]))

    def _enqueue(self, context: Any, out: torch.Tensor) -> None:
        context.set_tensor_address(self.outputs[0], _address(self.outputs[0], out))
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise GenerationError("TensorRT execution failed")

    def __call__(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            feeds = self.prepare(feeds)
            self.check(feeds)
            key = tuple((n, tuple(t.shape)) for n, t in sorted(feeds.items()))
            self.stream.wait_stream(caller)
            with torch.cuda.stream(self.stream):
                entry = self.graphs.get(key) if self.cuda_graphs else None
                if entry is None and self.cuda_graphs and self.capture_enabled and len(self.graphs) < MAX_GRAPHS:
                    entry = self._capture(key, feeds)
                if entry is not None:
                    for name, tensor in feeds.items():
                        entry.static_in[name].copy_(tensor)
                    entry.graph.replay()
                    out = entry.static_out.clone()  # the next replay overwrites static_out
                else:
                    out_shape = self._bind(self.eager, feeds)
                    out = torch.empty(out_shape, dtype=self.dtypes[self.outputs[0]], device=self.device)
                    self._enqueue(self.eager, out)
            caller.wait_stream(self.stream)
            out.record_stream(caller)
            return out

    def _capture(self, key: tuple[Any, ...], feeds: dict[str, torch.Tensor]) -> _Graph:
        """Capture ``key``'s shape on a context of its own (called on ``self.stream``, during warm-up)."""
        context = self.new_context()
        static_in = {n: t.clone() for n, t in feeds.items()}
        out_shape = self._bind(context, static_in)
        static_out = torch.empty(out_shape, dtype=self.dtypes[self.outputs[0]], device=self.device)
        self._enqueue(context, static_out)  # one run first: TensorRT sets up the new shape outside capture
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls from other threads (codecs, the event loop) cannot break the capture.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self._enqueue(context, static_out)
        entry = _Graph(context, graph, static_in, static_out)
        self.graphs[key] = entry
        logger.debug("captured CUDA graph for %s", key)
        return entry


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
    during ``warmup`` (each with its own execution context); other shapes run eagerly.
    """

    name = "tensorrt"
    needs_warmup = True  # one CUDA graph per exact shape, captured only during warm-up

    def __init__(self, components: Any, options: BackendOptions | None = None, *, cuda_graphs: bool = True) -> None:
        super().__init__(components, options)
        try:
            import tensorrt as trt
        except ImportError as exc:
            from ditstream.trt_build.specs import trt_install_hint

            raise BackendUnavailableError(f"backend 'tensorrt' needs the tensorrt package: {trt_install_hint()}") \
                from exc
        if components.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError(f"backend 'tensorrt' needs a CUDA device; the model is on {components.device}")
        from ditstream.trt_build.build import DEFAULT_OPT_LEVEL, check_trt_major, get_or_build_engine
        from ditstream.trt_build.cache import EngineCache
        from ditstream.trt_build.specs import build_profile

        try:
            check_trt_major(trt)
        except RuntimeError as exc:
            raise BackendUnavailableError(f"backend 'tensorrt': {exc}") from exc
        self._trt = trt
        o = self.options
        self.cache = EngineCache(o.cache_dir)
        # The same profile build-engine computes from the same options: the same cache entry.
        self.profile = build_profile(components, o.resolutions, o.batches, seq_len=o.seq_len)
        self._sizes = o.resolutions or DEFAULT_RESOLUTIONS
        opt_level = o.opt_level if o.opt_level is not None else DEFAULT_OPT_LEVEL
        self.runners: dict[str, _Runner] = {}
        device = components.device
        # One stream and one scratch block for the three engines: their calls never overlap.
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device)
        self.scratch = _Scratch(device)
        for component in ("transformer", "vae_encoder", "vae_decoder"):
            try:
                path = get_or_build_engine(components, component, self.profile, cache=self.cache,
                                           opt_level=opt_level, deadline=o.build_deadline)
            except Exception as exc:
                raise BackendUnavailableError(f"backend 'tensorrt' could not build {component}: {exc}") from exc
            self.runners[component] = _Runner(trt, path, device, cuda_graphs, stream=self.stream,
                                              scratch=self.scratch)
        self._with_guidance = "guidance" in self.runners["transformer"].inputs
        logger.info("tensorrt backend ready (TensorRT %s, %s)", trt.__version__, self.profile.describe())

    @property
    def limits(self) -> BackendLimits:
        """The build profile: every call must fit its batch, height and width ranges."""
        p = self.profile
        return BackendLimits(max_batch=p.batch[2], min_batch=p.batch[0], width=(p.width[0], p.width[2]),
                             height=(p.height[0], p.height[2]), sizes=self._sizes)

    def warmup(self, shapes: list[tuple[int, int, int]]) -> None:
        """Capture the CUDA graphs of each ``(batch, height, width)`` (engine thread, before serving)."""
        from ditstream.trt_build.export import transformer_inputs

        f = self.components.vae_scale_factor
        for batch, height, width in shapes:
            if not self.profile.covers(batch, height, width):
                raise GenerationError(f"shape batch={batch} {width}x{height} is outside the engine profile "
                                      f"({self.profile.describe()})")
        for runner in self.runners.values():
            runner.capture_enabled = True
        try:
            with torch.cuda.device(self.device):
                for batch, height, width in shapes:
                    x, t, ehs, mask, *g = transformer_inputs(self.components.transformer, batch, height // f,
                                                             width // f, seq_len=self.profile.seq_len[1],
                                                             device=self.device)
                    images = torch.zeros(batch, 3, height, width, device=self.device)
                    self.denoise(x, t, ehs, mask, g[0] if g else None)
                    self.decode(self.encode(images))
                torch.cuda.synchronize(self.device)
        finally:
            for runner in self.runners.values():
                runner.capture_enabled = False

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
