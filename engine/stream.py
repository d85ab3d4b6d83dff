"""Per-stream state: config, plan, input slot, output queue, the frames in flight and counters."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from ditstream.engine.config import StreamConfig
from ditstream.engine.motion import MotionMeter
from ditstream.engine.plan import Plan, Transition
from ditstream.engine.queues import FrameInbox, OutputQueue
from ditstream.engine.similarity import SimilarityFilter
from ditstream.engine.temporal_stream import TemporalMemory, TemporalRef
from ditstream.engine.types import Frame, StreamOutput, StreamStats

_ids = itertools.count(1)


def new_stream_id(prefix: str = "s") -> str:
    return f"{prefix}{next(_ids)}"


@dataclass
class InFlight:
    """A frame inside a stream's pipeline: latent ``x`` at step ``stage`` of its plan.

    ``x`` is None for a frame the similarity filter skipped: it travels through the pipeline
    without compute, so outputs stay in input order, and re-sends the previous output.
    """

    frame: Frame
    plan: Plan
    x: torch.Tensor | None
    stage: int = 0
    taken_at: float = 0.0
    inference_s: float = 0.0
    skipped: bool = False
    #: The decoded output once all steps ran: uint8 (H, W, 3), or float32 in [0, 1] for parity runs.
    result: np.ndarray | None = None
    #: Set when a model call this frame took part in failed: the frame is done, with no image.
    error: Exception | None = None
    #: Latent feedback: the stream's last output latent this frame's entry is mixed with, if any.
    previous: torch.Tensor | None = None
    #: The final clean latent (kept after decoding when the stream feeds it back).
    latent: torch.Tensor | None = None
    #: Attention memory (``temporal``): the stream's memory this frame reads and updates, if any.
    temporal: TemporalRef | None = None
    #: ``motion_adaptive``: the factor on this frame's memory weight and feedback (1: unscaled).
    motion_scale: float = 1.0

    def fail(self, error: Exception) -> None:
        """End this frame with ``error``: it drops its latent and is emitted, in order, as an error."""
        self.error = error
        self.x = None
        self.result = None
        if self.plan is not None:
            self.stage = self.plan.steps

    @property
    def done(self) -> bool:
        return self.stage >= self.plan.steps


@dataclass
class StreamState:
    """Everything the core keeps for one stream (or one-shot job)."""

    id: str
    config: StreamConfig
    plan: Plan
    outputs: OutputQueue[StreamOutput]
    filter: SimilarityFilter
    inbox: FrameInbox[Frame] = field(default_factory=FrameInbox)
    pipeline: deque[InFlight] = field(default_factory=deque)
    stats: StreamStats = field(default_factory=StreamStats)
    last_output: np.ndarray | None = None
    #: Clean latent of ``last_output`` when its frame had feedback on (the next frame's ``previous``).
    last_latent: torch.Tensor | None = None
    #: A glide to ``config``'s plan in progress (``plan`` is then where the stream is now).
    transition: Transition | None = None
    #: Attention memory of past frames (``temporal``; ``engine.temporal_stream``).
    memory: TemporalMemory = field(default_factory=TemporalMemory)
    #: Input motion measure (``motion_adaptive``; ``engine.motion``).
    motion: MotionMeter = field(default_factory=MotionMeter)
    #: One-shot jobs are removed after their single output.
    one_shot: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.inbox) or bool(self.pipeline)
