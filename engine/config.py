"""Engine configuration as frozen data.

Constructors take these objects; nothing in ``engine`` reads the environment. ``StreamConfig`` is
validated once (``validate``) so that the hot loop can trust it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ditstream.engine.errors import ValidationError

Mode = Literal["img2img", "txt2img"]

#: Latent/pixel sizes must be multiples of this (DC-AE downsamples 32×; the demo model 8×).
DEFAULT_SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where.

    ``model`` is ``"demo"`` (the model shipped in the repo), a local folder in diffusers layout or a
    hub id. ``device``/``dtype`` ``"auto"`` pick CUDA + bf16 when available, else CPU + fp32.
    ``complex_human_instruction``: ``None`` uses the model's own default (SANA-Sprint's long prefix;
    none for the demo model), ``False`` disables it, ``True`` forces diffusers' default prefix.
    """

    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "torch"
    prompt_cache_size: int = 256
    #: Text tokens per prompt; ``None`` = the model's ``ditstream.json`` value, else 300 (SANA's).
    #: Padding is masked out of cross-attention, so a shorter length changes cost, not results,
    #: for prompts that fit.
    max_sequence_length: int | None = None
    complex_human_instruction: bool | None = None
    local_files_only: bool = True


@dataclass(frozen=True)
class FilterConfig:
    """Stochastic similarity filter (StreamDiffusion's SSF), per stream.

    Skip probability is ``max(0, 1 - (1 - c) / (1 - threshold))`` for cosine similarity ``c`` between
    the new input and the last processed one; never more than ``max_skip`` skips in a row.
    """

    enabled: bool = False
    threshold: float = 0.98
    max_skip: int = 10
    seed: int | None = None
    downscale: int = 32

    def validate(self) -> FilterConfig:
        if not 0.0 <= self.threshold < 1.0:
            raise ValidationError(
                f"filter.threshold must be in [0, 1), got {self.threshold}", field="filter.threshold"
            )
        if not 0 <= self.max_skip <= 1000:
            raise ValidationError(f"filter.max_skip must be in [0, 1000], got {self.max_skip}", field="filter.max_skip")
        if not 4 <= self.downscale <= 256:
            raise ValidationError(f"filter.downscale must be in [4, 256], got {self.downscale}", field="filter.downscale")
        return self


@dataclass(frozen=True)
class StreamConfig:
    """Everything that decides a stream's (or a one-shot job's) output.

    ``steps`` is the number of model calls per frame (1–4). img2img enters at angle
    ``strength · π/2``; txt2img starts from pure noise. ``timesteps`` overrides the step list with
    explicit angles (descending, in (0, π/2]).
    """

    prompt: str = ""
    mode: Mode = "img2img"
    steps: int = 1
    strength: float = 0.6
    seed: int = 0
    width: int = 512
    height: int = 512
    guidance_scale: float = 4.5
    timesteps: tuple[float, ...] | None = None
    filter: FilterConfig = field(default_factory=FilterConfig)

    def validate(self, *, max_prompt_chars: int = 2000, max_pixels: int = 1024 * 1024,
                 size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> StreamConfig:
        """Check every field; raise ``ValidationError`` naming the field, limit and value."""
        if self.mode not in ("img2img", "txt2img"):
            raise ValidationError(f"mode must be 'img2img' or 'txt2img', got {self.mode!r}", field="mode")
        if not isinstance(self.prompt, str):
            raise ValidationError("prompt must be a string", field="prompt")
        if len(self.prompt) > max_prompt_chars:
            raise ValidationError(
                f"prompt is {len(self.prompt)} characters; the limit is {max_prompt_chars}", field="prompt"
            )
        if not 1 <= self.steps <= 4:
            raise ValidationError(f"steps must be in [1, 4], got {self.steps}", field="steps")
        if not 0.0 < self.strength <= 1.0:
            raise ValidationError(f"strength must be in (0, 1], got {self.strength}", field="strength")
        if not 0 <= self.seed < 2**63:
            raise ValidationError(f"seed must be in [0, 2^63), got {self.seed}", field="seed")
        for name, v in (("width", self.width), ("height", self.height)):
            if v <= 0 or v % size_multiple:
                raise ValidationError(
                    f"{name} must be a positive multiple of {size_multiple}, got {v}", field=name
                )
        if self.width * self.height > max_pixels:
            raise ValidationError(
                f"size {self.width}x{self.height} is {self.width * self.height} pixels; the limit is {max_pixels}",
                field="size",
            )
        if not 0.0 <= self.guidance_scale <= 50.0:
            raise ValidationError(f"guidance_scale must be in [0, 50], got {self.guidance_scale}", field="guidance_scale")
        if self.timesteps is not None:
            ts = tuple(float(t) for t in self.timesteps)
            if len(ts) != self.steps:
                raise ValidationError(f"timesteps has {len(ts)} entries but steps is {self.steps}", field="timesteps")
            if any(not 0.0 < t <= math.pi / 2 + 1e-4 for t in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
                raise ValidationError("timesteps must be strictly descending angles in (0, π/2]", field="timesteps")
        self.filter.validate()
        return self

    def replace(self, **changes: Any) -> StreamConfig:
        """A copy with ``changes``; ``filter`` may be given as a dict of its fields."""
        if isinstance(changes.get("filter"), dict):
            changes["filter"] = replace(self.filter, **changes["filter"])
        if changes.get("timesteps") is not None:
            changes["timesteps"] = tuple(changes["timesteps"])
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = f"{self.width}x{self.height}"
        return d


@dataclass(frozen=True)
class BatchConfig:
    """When a tick starts (``engine/batching.py``): wait for expected frames, at most ``max_wait`` ticks."""

    #: Longest the engine idles with work pending, waiting for expected frames, as a fraction of
    #: the recent tick duration; 0 = start a tick as soon as any stream has work.
    max_wait: float = 0.5
    #: An expected frame is given up on this many mean prediction errors after its predicted time…
    grace: float = 2.0
    #: …but never less than this (seconds): scheduling jitter of the threads that deliver frames
    #: (2 ms left 12 % of closed-loop calls a sample short on a busy 2-core machine; docs/benchmarks.md).
    min_grace_s: float = 0.005
    #: Weight of the newest sample in the running means (intervals, gaps, errors, tick duration).
    smoothing: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_wait <= 4.0:
            raise ValueError(f"batching.max_wait must be in [0, 4] ticks, got {self.max_wait}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"batching.smoothing must be in (0, 1], got {self.smoothing}")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler settings: batch bound, batch formation and queue sizes."""

    max_batch: int = 16
    batching: BatchConfig = field(default_factory=BatchConfig)
    #: Pending input frames per stream (``queues.FrameInbox``): 2 keeps a client's two frames in
    #: flight; a frame that sat through a tick is still replaced by a newer one (latest wins).
    inbox_depth: int = 2
    output_queue_size: int = 4
    idle_wait_s: float = 0.05
    max_pixels: int = 1024 * 1024
    max_prompt_chars: int = 2000
    #: Emit float32 [0, 1] images instead of uint8 (parity tests compare before rounding).
    output_float: bool = False
