"""Attention memory across frames (``temporal``): SANA's linear self-attention, carried from frame to frame.

SANA's self-attention is ReLU linear attention (diffusers ``SanaLinearAttnProcessor2_0``): per head,
a frame's whole attention is the state ``S = [V; 1]·φ(K)ᵀ`` of size (d+1)×d, and the output is
``S·φ(Q)`` with its first d rows divided by its last. Attending to past frames as well is one
addition: the state used is ``own + w·M``, where ``M`` is the stream's memory of past states for the
same denoising step (slot) and block, and ``w`` its weight (``temporal``, times the motion scale of
``engine.motion`` with ``motion_adaptive``). O(d²) per head and frame, whatever the history.

The memory is an exponential moving average, ``M ← decay·M + (1 − decay)·own`` (the first frame sets
``M = own``), so it has the scale of one frame's state and ``temporal`` 1 weighs history like the
frame itself. Because a state and any multiple of it normalise to the same output, a still noiseless
input gives the frames it gives without memory (up to float rounding).

Per stream, in one batch: the core's model calls mix rows of many streams. Before a call the core
opens a ``TemporalAttention.call`` with, for that call's rows, the memories to add (rows that read),
their weights, and the rows whose own states to return (rows whose stream has ``temporal`` > 0). Rows
of streams without memory are not touched at all (``index_add`` leaves unindexed rows as they are),
so ``temporal: 0`` is bit-identical to a stream without it. A call that fails updates nothing.

Backends: ``torch`` runs the processors eagerly, reading the call from this thread's state;
``compile`` traces them inside ``TemporalAttention.graph``, where the memory, weights and own states
are the compiled graph's inputs and outputs (``backends.compile_backend``). ``onnx`` and ``tensorrt``
have no hook and refuse ``temporal`` > 0 by name (``temporal_refusal``).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ditstream.engine.backends.base import Backend

#: The diffusers processor whose maths this module reproduces (and extends).
LINEAR_PROCESSOR = "SanaLinearAttnProcessor2_0"
#: transformer → its hook (weak: a transformer dropped drops its hook).
_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, TemporalAttention] = weakref.WeakKeyDictionary()


@dataclass
class _Call:
    """One model call's memory traffic: rows that read memory and rows whose states come back."""

    read_rows: torch.Tensor | None  # (K,) long
    weights: torch.Tensor | None  # (K, 1, 1, 1) fp32
    memory: list[torch.Tensor] | None  # per block (K, H, d+1, d) fp32
    write_rows: torch.Tensor | None  # (J,) long
    states: list[torch.Tensor | None] = field(default_factory=list)  # per block (J, H, d+1, d)
    write_all: bool = False  # every row writes (no index)

    stacked: torch.Tensor | None = None  # (K, blocks, H, d+1, d): ``memory`` before the per-block split
    state_shape: tuple[int, ...] = ()  # (H, d+1, d): one block's state per row
    own_states: torch.Tensor | None = None  # (J, blocks, H, d+1, d), set whole by a compiled graph

    def own(self) -> torch.Tensor:
        """The written rows' own states, (J, blocks, H, d+1, d)."""
        if self.own_states is not None:
            return self.own_states
        return torch.stack(self.states, dim=1)  # type: ignore[arg-type]

    def dense(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's memory and weight as plain tensors, for a graph that takes them as inputs
        (``TemporalAttention.graph``): memory (batch, blocks·H·(d+1)·d), zero where a row reads nothing,
        and weights (batch,), zero there too (``scores + 0·0`` is ``scores`` exactly)."""
        if self.stacked is not None and self.weights is not None and self.read_rows is None:  # every row reads
            return self.stacked.flatten(1), self.weights.view(-1)
        memory = torch.zeros(batch, len(self.states), *self.state_shape, dtype=torch.float32, device=device)
        weights = torch.zeros(batch, dtype=torch.float32, device=device)
        if self.stacked is not None and self.weights is not None:
            memory.index_copy_(0, self.read_rows, self.stacked)
            weights.index_copy_(0, self.read_rows, self.weights.view(-1))
        return memory.flatten(1), weights

    def set_own(self, states: torch.Tensor) -> None:
        """Every row's own states from a graph, flat as ``dense``'s memory: keep the written rows'."""
        states = states.view(states.shape[0], len(self.states), *self.state_shape)
        self.own_states = states if self.write_rows is None else states.index_select(0, self.write_rows)


class TemporalProcessor:
    """diffusers' linear attention with an optional per-row memory added to the state.

    Outside a ``TemporalAttention.call`` it is diffusers' own processor (the object it replaced),
    so installing it changes nothing for streams without memory.
    """

    def __init__(self, owner: TemporalAttention, index: int, base: Any) -> None:
        self.owner = owner
        self.index = index
        self.base = base

    def __deepcopy__(self, memo: dict) -> Any:
        """A copied model gets diffusers' processor back (the hook belongs to the original)."""
        return copy.deepcopy(self.base, memo)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Traced by torch.compile, the call is the graph's own (``TemporalAttention.graph``): its memory
        # is the graph's inputs, not a thread's Python state, which a compiled graph cannot read.
        call = self.owner.graph_call if torch.compiler.is_compiling() else self.owner.current
        if call is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self._with_memory(attn, hidden_states, encoder_hidden_states, call)

    def _with_memory(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                     call: _Call) -> torch.Tensor:
        # Line for line ``SanaLinearAttnProcessor2_0.__call__`` (diffusers 0.3x–0.4x), plus the memory.
        original_dtype = hidden_states.dtype
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
        query = F.relu(query)
        key = F.relu(key)
        query, key, value = query.float(), key.float(), value.float()
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        scores = torch.matmul(value, key)  # (B, H, d+1, d): the frame's own state
        if call.write_all:
            call.states[self.index] = scores  # not written to below: ``scores`` is rebound, not changed
        elif call.write_rows is not None:
            call.states[self.index] = scores.index_select(0, call.write_rows)
        if call.memory is not None and call.weights is not None:
            extra = call.memory[self.index] * call.weights
            # Same per-element addition either way; rows not indexed are left exactly as they are.
            scores = scores + extra if call.read_rows is None else scores.index_add(0, call.read_rows, extra)
        hidden_states = torch.matmul(scores, query)
        hidden_states = hidden_states[:, :, :-1] / (hidden_states[:, :, -1:] + 1e-15)
        hidden_states = hidden_states.flatten(1, 2).transpose(1, 2)
        hidden_states = hidden_states.to(original_dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


class TemporalAttention:
    """The memory hook of one transformer: ``TemporalProcessor`` on every linear self-attention.

    ``refusal`` says why this transformer cannot carry memory (a self-attention that is not linear,
    named), ``None`` when it can. Installed once per transformer (``for_transformer``).
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        # Per thread: an engine thread's call never lends its memory to another thread's call on the
        # same model object (two cores on one set of components, a one-shot generator beside a stream).
        self._local = threading.local()
        #: The call of the graph being traced (``graph``); set and cleared inside the traced code only.
        self.graph_call: _Call | None = None
        self.refusal: str | None = None
        blocks = list(getattr(transformer, "transformer_blocks", []))
        names = [type(getattr(getattr(b, "attn1", None), "processor", None)).__name__ for b in blocks]
        bad = sorted({n for n in names if n not in (LINEAR_PROCESSOR, TemporalProcessor.__name__)})
        if not blocks:
            self.refusal = f"{type(transformer).__name__} has no transformer_blocks with a self-attention"
        elif bad:
            self.refusal = (f"its self-attention processor is {', '.join(bad)}, not the linear attention "
                            f"({LINEAR_PROCESSOR}) whose state the memory adds to")
        self.blocks = len(blocks)
        #: One block's state per row, (H, d+1, d): the shape a graph's memory input takes.
        self.state_shape: tuple[int, int, int] | None = None
        if self.refusal is None:
            attn = blocks[0].attn1
            d = attn.to_q.out_features // attn.heads
            self.state_shape = (attn.heads, d + 1, d)
            for i, b in enumerate(blocks):
                proc = b.attn1.processor
                base = proc.base if isinstance(proc, TemporalProcessor) else proc
                b.attn1.set_processor(TemporalProcessor(self, i, base))

    @property
    def current(self) -> _Call | None:
        """The memory of the model call this thread is inside, if any."""
        return getattr(self._local, "call", None)

    @classmethod
    def for_transformer(cls, transformer: torch.nn.Module) -> TemporalAttention:
        """The hook of ``transformer``, installed on first use (one per transformer object; installed
        again if its processors were replaced since)."""
        hook = _HOOKS.get(transformer)
        if hook is None or not hook.installed_on(transformer):
            hook = cls(transformer)
            _HOOKS[transformer] = hook
        return hook

    def installed_on(self, transformer: torch.nn.Module) -> bool:
        """Whether every self-attention of ``transformer`` runs this hook's processor (or, refused, none does)."""
        procs = [getattr(getattr(b, "attn1", None), "processor", None)
                 for b in getattr(transformer, "transformer_blocks", [])]
        if self.refusal is not None:
            return not any(isinstance(p, TemporalProcessor) for p in procs)
        return all(isinstance(p, TemporalProcessor) and p.owner is self for p in procs)

    def graph(self, transformer_call: Callable[[], torch.Tensor], memory: torch.Tensor,
              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``transformer_call()`` with every row adding ``weights[i]·memory[i, block]`` to its state, as
        a function of tensors only, for ``torch.compile`` to trace (the compile backend's transformer
        with memory). ``memory`` comes flat, (B, blocks·H·(d+1)·d): as (B, blocks, H, d+1, d) the batch
        could equal a head count, and dynamo's duck sizing would then fix the batch to the head count
        (one more compile per batch size). Returns its output and every row's own states, flat too."""
        memory = memory.view(-1, self.blocks, *self.state_shape)  # type: ignore[misc]
        call = _Call(read_rows=None, weights=weights.view(-1, 1, 1, 1), memory=list(memory.unbind(1)),
                     write_rows=None, states=[None] * self.blocks, write_all=True)
        self.graph_call = call
        out = transformer_call()
        self.graph_call = None
        return out, torch.stack(call.states, dim=1).flatten(1)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def call(self, batch: int, read_rows: list[int], weights: list[float], memory: list[torch.Tensor],
             write_rows: list[int], device: torch.device) -> Iterator[_Call]:
        """Run the model calls inside (``batch`` rows) with memory: row ``read_rows[k]`` adds
        ``weights[k]·memory[k][block]`` (``memory[k]``: (blocks, H, d+1, d)); after, ``.own()`` holds the
        own states of ``write_rows`` (J, blocks, H, d+1, d), in ``write_rows`` order."""
        c = _Call(read_rows=None, weights=None, memory=None, write_rows=None, states=[None] * self.blocks,
                  state_shape=self.state_shape or ())
        if read_rows:
            if read_rows != list(range(batch)):  # every row reads: plain addition, no index
                c.read_rows = torch.tensor(read_rows, dtype=torch.long, device=device)
            c.weights = torch.tensor(weights, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
            c.stacked = torch.stack(memory)
            c.memory = [c.stacked[:, b] for b in range(self.blocks)]
        if write_rows:
            c.write_all = write_rows == list(range(batch))
            if not c.write_all:
                c.write_rows = torch.tensor(write_rows, dtype=torch.long, device=device)
        self._local.call = c
        try:
            yield c
        finally:
            self._local.call = None


def temporal_refusal(backend: Backend) -> str | None:
    """Why ``backend`` cannot carry attention memory (``temporal`` > 0), naming the backend or the
    processor; ``None`` when it can. ``EngineLimits.temporal_refusal``: refused at stream open."""
    hook = backend.temporal_attention()
    if hook is None:
        return (f"the {backend.name} backend cannot carry attention memory (temporal > 0): its transformer "
                "is a fixed graph; serve it with --backend torch or --backend compile")
    if hook.refusal is not None:
        return f"this model cannot carry attention memory (temporal > 0): {hook.refusal}"
    return None
