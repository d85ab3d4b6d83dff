"""The core's side of attention memory: each stream's memory, and the hooks the core calls.

Owned by the engine thread. A stream's ``TemporalMemory`` holds, per stream-batch slot (denoising
step index) and per transformer block, the moving average of its frames' self-attention states
(``engine.temporal``). The core calls three hooks: ``admit`` when a frame enters (motion scale,
memory weight), ``memory_call`` around each denoise call (which rows read and write memory), and
``reconfigure`` when the stream's config changes.

When the memory is dropped: on a size change (the state shape changes with the latent), when the
prompt, mode, step count or step list change by a jump (``transition_frames`` 0: the new prompt's
picture owes nothing to the old one's attention), and when ``temporal`` goes to 0. A glide
(``transition_frames`` > 0) keeps it: the glide's own frames pull the memory along with decay
``temporal_decay``, which is what a glide is for. Frames the similarity filter skips compute nothing
and leave the memory as it is; a failed call updates nothing.

Size: per stream, ``steps × blocks × heads × (d+1) × d`` fp32 values, whatever the image size (the
state sums over tokens): for SANA(-Sprint) 0.6B (28 blocks, 36 heads of d = 32) 36 × 33 × 32 × 4 B =
152 kB per block and slot, 4.3 MB per step slot (28 blocks), at 512² as at 1024².
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from ditstream.engine.motion import motion_scale

if TYPE_CHECKING:
    from ditstream.engine.backends.base import Backend
    from ditstream.engine.config import StreamConfig
    from ditstream.engine.stream import InFlight, StreamState


@dataclass
class TemporalMemory:
    """One stream's memory: slot → its blocks' states (blocks, heads, d+1, d), for latents of ``shape``."""

    slots: dict[int, torch.Tensor] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None
    #: Bumped by every reset: frames that entered before it neither read nor write the new memory.
    epoch: int = 0

    def reset(self) -> None:
        self.slots.clear()
        self.epoch += 1

    def update(self, slot: int, own: torch.Tensor, decay: float) -> None:
        """``M ← decay·M + (1 − decay)·own`` (the first frame sets ``M = own``); ``own`` (blocks, H, d+1, d)."""
        old = self.slots.get(slot)
        self.slots[slot] = own.clone() if old is None else old.mul(decay).add_(own, alpha=1.0 - decay)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots.values())


@dataclass
class TemporalRef:
    """A frame's link to its stream's memory: how much it reads, and the epoch it entered in."""

    memory: TemporalMemory
    epoch: int
    weight: float
    decay: float

    @property
    def live(self) -> bool:
        return self.epoch == self.memory.epoch


def admit(state: StreamState, item: InFlight) -> None:
    """A frame enters: measure motion (``motion_adaptive``) and link it to the stream's memory (``temporal``)."""
    cfg = item.plan.config
    scale = 1.0
    if cfg.motion_adaptive and item.frame.image is not None:
        scale = motion_scale(state.motion.measure(item.frame.image))
    item.motion_scale = scale
    if cfg.temporal <= 0:
        return
    memory = state.memory
    if memory.shape != item.plan.latent_shape:
        memory.reset()
        memory.shape = item.plan.latent_shape
    item.temporal = TemporalRef(memory, memory.epoch, cfg.temporal * scale, cfg.temporal_decay)


def reconfigure(state: StreamState, old: StreamConfig, new: StreamConfig, gliding: bool) -> None:
    """Drop the memory when the new config owes nothing to the old picture (see the module doc)."""
    jump = not gliding and (old.prompts != new.prompts or old.mode != new.mode or old.steps != new.steps
                            or old.timesteps != new.timesteps)
    if new.temporal <= 0 or jump or (old.width, old.height) != (new.width, new.height):
        state.memory.reset()


@contextlib.contextmanager
def memory_call(backend: Backend, chunk: list[InFlight]) -> Iterator[None]:
    """Around one denoise call of ``chunk``: rows read their stream's memory for their slot, and on
    success each row's own states update it. No row with memory: nothing happens at all."""
    rows = [(i, it.temporal, it.stage) for i, it in enumerate(chunk) if it.temporal is not None and it.temporal.live]
    if not rows:
        yield
        return
    hook = backend.temporal_attention()
    assert hook is not None and hook.refusal is None, "check_temporal admits no such stream"
    read = [(i, ref.weight, ref.memory.slots[slot]) for i, ref, slot in rows
            if ref.weight > 0 and slot in ref.memory.slots]
    device = chunk[0].x.device if chunk[0].x is not None else torch.device("cpu")
    with hook.call(len(chunk), [i for i, _, _ in read], [w for _, w, _ in read], [m for _, _, m in read],
                   [i for i, _, _ in rows], device) as call:
        yield
    own = call.own()
    for j, (_, ref, slot) in enumerate(rows):
        if ref.live:  # not reset while the call ran
            ref.memory.update(slot, own[j], ref.decay)
