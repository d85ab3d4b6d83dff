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
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Iterator
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

    def own(self) -> torch.Tensor:
        """The written rows' own states, (J, blocks, H, d+1, d)."""
        return torch.stack(self.states, dim=1)  # type: ignore[arg-type]


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
        call = self.owner.current
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
        if self.refusal is None:
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

    @contextlib.contextmanager
    def call(self, batch: int, read_rows: list[int], weights: list[float], memory: list[torch.Tensor],
             write_rows: list[int], device: torch.device) -> Iterator[_Call]:
        """Run the model calls inside (``batch`` rows) with memory: row ``read_rows[k]`` adds
        ``weights[k]·memory[k][block]`` (``memory[k]``: (blocks, H, d+1, d)); after, ``.own()`` holds the
        own states of ``write_rows`` (J, blocks, H, d+1, d), in ``write_rows`` order."""
        c = _Call(read_rows=None, weights=None, memory=None, write_rows=None, states=[None] * self.blocks)
        if read_rows:
            if read_rows != list(range(batch)):  # every row reads: plain addition, no index
                c.read_rows = torch.tensor(read_rows, dtype=torch.long, device=device)
            c.weights = torch.tensor(weights, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
            stacked = torch.stack(memory)
            c.memory = [stacked[:, b] for b in range(self.blocks)]
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
                "is a fixed graph; serve it with --backend torch")
    if hook.refusal is not None:
        return f"this model cannot carry attention memory (temporal > 0): {hook.refusal}"
    return None
