"""Plain data that crosses the engine boundary (server and runner both use these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Frame:
    """One input frame: ``image`` is uint8 (H, W, 3) RGB, or ``None`` for a txt2img tick."""

    image: np.ndarray | None
    seq: int = 0
    ts: float = 0.0
    received_at: float = 0.0


@dataclass
class StreamOutput:
    """One output frame, answering the input with the same ``seq``/``ts``.

    ``skipped`` is true when the similarity filter skipped the input and ``image`` is the previous
    output again. ``timings`` holds seconds: ``queue`` (waiting in the input slot), ``inference``
    (the batched model calls this frame took part in), ``total`` (receipt to output).
    """

    stream_id: str
    seq: int
    ts: float
    image: np.ndarray | None
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    #: A ``GenerationError`` when the model call(s) for this input failed; ``image`` is then ``None``
    #: and the stream goes on with its next input.
    error: Any = None
    #: The output already coded (it came so from a worker: a stream frame's JPEG, or a REST image in
    #: the format the request asked for): sent to the client as it is, and ``image`` may then be
    #: ``None`` (the gateway never decodes it).
    encoded: EncodedImage | None = None


@dataclass(frozen=True)
class EncodedImage:
    """Coded bytes of an image, with its size, format and the quality it was coded at (0: unknown)."""

    data: bytes
    width: int
    height: int
    quality: int = 0
    format: str = "jpeg"


@dataclass
class StreamStats:
    """Counters per stream; ``dropped`` counts inputs replaced before processing and outputs evicted."""

    processed: int = 0
    skipped: int = 0
    #: Inputs whose model call failed (answered with an error, not an image).
    failed: int = 0
    dropped_inputs: int = 0
    dropped_outputs: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_inputs + self.dropped_outputs

    def as_dict(self) -> dict[str, int]:
        return {"processed": self.processed, "skipped": self.skipped, "failed": self.failed, "dropped": self.dropped,
                "dropped_inputs": self.dropped_inputs, "dropped_outputs": self.dropped_outputs}


class MetricsSink(Protocol):
    """Where an engine reports its model calls (the server's ``Metrics``; called on the engine thread)."""

    registry: Any

    def observe_batch(self, size: int, _seconds: float = 0.0) -> None: ...

    def observe_failure(self, stage: str, frames: int) -> None: ...
