"""torch.compile backend, with CUDA graphs per batch bucket on GPU.

Why buckets: CUDA graphs need static shapes, and the cross-stream scheduler produces every batch
size from 1 to ``max_batch``. Padding a batch up to the next bucket (1, 2, 4, 8, 16, ...) keeps the
number of captured graphs small; the pad rows are copies of the last real row and are sliced away,
and since every network here treats batch rows independently a row's result does not depend on its
neighbours (the engine's isolation test checks exactly that). On CPU nothing is padded and the
graphs are compiled with dynamic shapes.

The modules compiled are the same wrappers the ONNX export uses (``trt_build.export``), so the
compiled graph has plain positional tensor inputs.

Attention memory (``engine.temporal``) is a second compiled graph of the same transformer,
``_MemoryTransformer``: every row's memory and weight are graph inputs (zero for rows that read none,
which then compute exactly what the graph without memory computes) and every row's own states a graph
output. A compiled graph cannot read a thread's Python state, and CUDA graphs replay only tensors, so
the memory travels as tensors. Calls with no memory row use the plain graph: streams without
``temporal`` pay nothing. With buckets (CUDA graphs) the warm-up captures both graphs per bucket;
without, the memory graph compiles (once, dynamic shapes) on the first call that needs it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from ditstream.engine.backends.base import Backend, BackendLimits
from ditstream.engine.errors import BackendUnavailableError

if TYPE_CHECKING:
    from ditstream.engine.config import BackendOptions
    from ditstream.engine.temporal import TemporalAttention

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def bucket_for(batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket ≥ ``batch`` (a batch beyond the last bucket runs unpadded)."""
    for b in buckets:
        if b >= batch:
            return b
    return batch


def uses_cuda_graphs(device_type: str, mode: str, compile_backend: str = "inductor") -> bool:
    """Whether ``torch.compile(mode=mode, backend=compile_backend)`` replays CUDA graphs on ``device_type``.

    Why it matters: a CUDA-graph output lives in memory the next replay overwrites, so the backend must
    copy it out (and pad to buckets, and mark each step). Inductor says which of its modes use graphs
    (``torch._inductor.list_mode_options``, the table torch.compile applies): ``reduce-overhead`` and
    ``max-autotune`` do, ``default`` and ``max-autotune-no-cudagraphs`` do not; an unknown mode is
    inductor's error. The ``cudagraphs`` dynamo backend always does; other backends never do.
    """
    if device_type != "cuda":
        return False
    if compile_backend == "cudagraphs":
        return True
    if compile_backend != "inductor":
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs", False))


def _pad(t: torch.Tensor | None, size: int) -> torch.Tensor | None:
    if t is None or t.shape[0] == size:
        return t
    extra = t[-1:].expand(size - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], dim=0)


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A (B,) fp32 tensor on ``device`` from a scalar, a 0-d or a (B,) tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.expand(batch) if t.ndim == 0 else t.reshape(batch)


class _MemoryTransformer(torch.nn.Module):
    """``(sample, timestep, ehs, mask, memory, weights[, guidance]) -> (output, states)``: the export
    wrapper's transformer with attention memory (``engine.temporal``) as explicit graph inputs and the
    rows' own states as an output, so a compiled graph (and its CUDA graphs) carries the memory without
    reading or writing a stream's Python state."""

    def __init__(self, export: torch.nn.Module, hook: TemporalAttention) -> None:
        super().__init__()
        self.export = export
        self.hook = hook

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, memory, weights,
                guidance=None):
        return self.hook.graph(
            lambda: self.export(sample, timestep, encoder_hidden_states, encoder_attention_mask, guidance),
            memory, weights)


class CompileBackend(Backend):
    """``torch.compile`` of transformer, VAE encoder and VAE decoder.

    ``mode``: default ``"reduce-overhead"`` on CUDA (inductor + CUDA graph trees, one graph per
    bucket shape) and ``"default"`` on CPU; ``"max-autotune"`` uses CUDA graphs too (``uses_cuda_graphs``). ``compile_backend``: the dynamo backend (``"inductor"``).
    ``pad_to_buckets``: pad batches up to ``buckets`` (default: only when CUDA graphs are used).
    """

    name = "compile"
    needs_warmup = True  # compiling (and capturing CUDA graphs) inside a live tick stalls every stream
    #: Prompt length used by ``warmup`` (the prompt cache pads to ``max_sequence_length``).
    warmup_seq_len = 300

    def __init__(self, components: Any, options: BackendOptions | None = None, *, mode: str | None = None,
                 compile_backend: str = "inductor", buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 pad_to_buckets: bool | None = None) -> None:
        super().__init__(components, options)
        if not hasattr(torch, "compile"):
            raise BackendUnavailableError("backend 'compile' needs torch >= 2.0")
        if compile_backend == "inductor" and self.device.type == "cpu":
            import shutil

            if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
                raise BackendUnavailableError("backend 'compile' on CPU needs a C++ compiler (g++ or clang++)")
        from ditstream.engine.temporal import TemporalAttention
        from ditstream.trt_build.export import TransformerExport, VaeDecoderExport, VaeEncoderExport

        self.mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self.cuda_graphs = uses_cuda_graphs(self.device.type, self.mode, compile_backend)
        # Padding to buckets bounds the number of CUDA graphs; without graphs it only costs compute.
        self.buckets = buckets if (self.cuda_graphs if pad_to_buckets is None else pad_to_buckets) else ()
        dynamic = None if self.cuda_graphs else True
        self._with_guidance = bool(getattr(components.transformer.config, "guidance_embeds", False))

        def comp(module: torch.nn.Module) -> Any:
            return torch.compile(module.eval(), mode=self.mode, backend=compile_backend, dynamic=dynamic,
                                 fullgraph=False)

        # Attention memory: a second graph of the same transformer (module docstring).
        self._temporal = TemporalAttention.for_transformer(components.transformer)
        self._transformer = comp(TransformerExport(components.transformer))
        self._memory_transformer = (None if self._temporal.refusal is not None else
                                    comp(_MemoryTransformer(TransformerExport(components.transformer), self._temporal)))
        self._encoder = comp(VaeEncoderExport(components.vae))
        self._decoder = comp(VaeDecoderExport(components.vae))
        logger.info("compile backend: mode=%s backend=%s cuda_graphs=%s buckets=%s", self.mode,
                    compile_backend, self.cuda_graphs, self.buckets or "none")

    def temporal_attention(self) -> TemporalAttention:
        return self._temporal

    @property
    def limits(self) -> BackendLimits:
        """With CUDA graphs, batches stop at the last bucket (beyond it every new size would recompile)."""
        return BackendLimits(max_batch=max(self.buckets) if self.buckets else None)

    def warmup_batches(self, max_batch: int) -> list[int]:
        """One batch per bucket up to ``max_batch``; with dynamic shapes one compile serves them all."""
        if not self.buckets:
            return [1]
        return sorted({min(self._bucket(b), max_batch) for b in range(1, max_batch + 1)})

    def _bucket(self, batch: int) -> int:
        if self.buckets:
            return bucket_for(batch, self.buckets)
        # Dynamic shapes still specialise on size 1; padding 1 -> 2 lets one graph serve every batch.
        return max(batch, 2)

    def _input(self, t: torch.Tensor | None, size: int) -> torch.Tensor | None:
        """``t`` as a compiled graph's input (called under inference mode): padded to ``size`` rows, an
        inference tensor and contiguous (a stride is a guard: a permuted view where a stack came before
        is a whole new compile). With dynamic shapes its batch (and a picture's height and width) gets
        a symbol of its own: duck sizing would otherwise tie a batch of 4 to the latents' 4 channels (a
        batch of 3 to RGB's 3, a square's width to its height), specialise it, and compile again for
        every other batch (or shape)."""
        t = _pad(t, size)
        if t is None:
            return None
        # An inference tensor, always: an ordinary one fails the dispatch-key guard of a graph compiled
        # on inference tensors (and the reverse), whichever came first; the engine's are inference
        # tensors, a direct caller's (or a batch that needed no padding) may not be.
        t = t.contiguous() if t.is_inference() else t.clone(memory_format=torch.contiguous_format)
        if not self.cuda_graphs:  # dynamic shapes
            # batch, and a picture's height and width (a square one would tie them the same way)
            for dim in (0, 2, 3) if t.ndim == 4 else (0,):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        return t

    def _finish(self, out: torch.Tensor, batch: int) -> torch.Tensor:
        # CUDA-graph outputs live in memory the next replay overwrites: copy them out.
        out = out[:batch]
        return out.clone() if self.cuda_graphs else out

    @torch.inference_mode()
    def warmup(self, shapes: list[tuple[int, int, int]]) -> None:
        """Compile (and capture, on CUDA) every bucket the ``(batch, height, width)`` shapes need.

        Under inference mode, as the engine calls run: its tensors are inference tensors, and a graph
        compiled for ordinary tensors fails dynamo's dispatch-key guard on them (the first real frame
        would compile, and capture, every graph again)."""
        import time

        from ditstream.trt_build.export import transformer_inputs

        f = self.components.vae_scale_factor
        deadline = self.options.build_deadline
        seen: set[tuple[int, int, int]] = set()
        for batch, height, width in shapes:
            key = (self._bucket(batch), height, width)
            if key in seen:
                continue
            if deadline is not None and time.monotonic() > deadline:  # as TensorRT builds are cancelled
                raise TimeoutError("torch.compile warm-up stopped: its deadline (build_deadline) passed")
            seen.add(key)
            b = key[0]
            x, t, ehs, mask, *g = transformer_inputs(self.components.transformer, b, height // f, width // f,
                                                     seq_len=self.warmup_seq_len, dtype=self.dtype,
                                                     device=self.device)
            images = torch.zeros(b, 3, height, width, device=self.device, dtype=self.components.vae.dtype)
            for _ in range(2 if self.cuda_graphs else 1):  # cudagraph trees record on the 2nd call
                self.denoise(x, t, ehs, mask, g[0] if g else None)
                self.decode(self.encode(images))
                if self.buckets and self._memory_transformer is not None:
                    # The graph with attention memory too, per bucket: else the first stream with
                    # ``temporal`` > 0 in a new bucket would stall every stream while it captures.
                    memory = [torch.zeros(self._temporal.blocks, *self._temporal.state_shape, device=self.device)] * b
                    rows = list(range(b))
                    with self._temporal.call(b, rows, [0.0] * b, memory, rows, self.device):
                        self.denoise(x, t, ehs, mask, g[0] if g else None)
        logger.info("compile backend warmed up for %d shape(s)", len(seen))

    @torch.inference_mode()
    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        batch = x.shape[0]
        size = self._bucket(batch)
        timestep = _per_sample(timestep, batch, x.device)
        if self._with_guidance and guidance is None:
            raise ValueError("this transformer embeds guidance; pass a guidance tensor")
        if guidance is not None:
            guidance = _per_sample(guidance, batch, x.device)
        args = [self._input(x.to(self.dtype), size), self._input(timestep, size),
                self._input(encoder_hidden_states.to(self.dtype), size), self._input(encoder_attention_mask, size)]
        # (a call is only open for streams with memory, which a model that refuses it never has)
        call = self._temporal.current if self._memory_transformer is not None else None
        if call is not None:
            memory, weights = call.dense(batch, x.device)
            args += [self._input(memory, size), self._input(weights, size)]
        if self._with_guidance:
            args.append(self._input(guidance, size))
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if call is None:
            return self._finish(self._transformer(*args), batch)
        out, states = self._memory_transformer(*args)
        call.set_own(self._finish(states, batch))
        return self._finish(out, batch)

    @torch.inference_mode()
    def encode(self, images):
        batch = images.shape[0]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        vae_dtype = self.components.vae.dtype
        return self._finish(self._encoder(self._input(images.to(vae_dtype), self._bucket(batch))), batch)

    @torch.inference_mode()
    def decode(self, latents):
        batch = latents.shape[0]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        vae_dtype = self.components.vae.dtype
        return self._finish(self._decoder(self._input(latents.to(vae_dtype), self._bucket(batch))), batch)
