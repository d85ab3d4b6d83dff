"""The one interface every backend implements.

A backend runs the three networks of a SANA-Sprint pipeline on batches. It owns no sampling math
(that is ``engine.sampler``) and no stream state: inputs and outputs are plain tensors, so that
``torch``, ``compile``, ``onnx`` and ``tensorrt`` are interchangeable and parity-tested against
``torch``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ditstream.engine.errors import ValidationError

if TYPE_CHECKING:
    import torch
    from ditstream.engine.config import BackendOptions
    from ditstream.engine.loader import ModelComponents
    from ditstream.engine.temporal import TemporalAttention


Span = tuple[int, int]


@dataclass(frozen=True)
class BackendLimits:
    """What one backend call may hold: batch and pixel size bounds, and the sizes it is built for.

    ``None`` means unbounded (eager torch). ``width``/``height`` are inclusive (min, max) pixels;
    ``sizes`` are the (width, height) a build profile was made for, which warm-up prepares first.
    A request outside these is refused when its stream or job opens, never inside a tick.
    """

    max_batch: int | None = None
    min_batch: int = 1
    width: Span | None = None
    height: Span | None = None
    sizes: tuple[Span, ...] = ()

    def describe(self) -> str:
        """E.g. ``"256-1024 px, batch 1-8"`` (``"any size, any batch"`` when unbounded)."""
        def span(v: Span) -> str:
            return f"{v[0]}-{v[1]}"
        if self.width is None and self.height is None:
            size = "any size"
        elif self.width == self.height:
            size = f"{span(self.width)} px"  # type: ignore[arg-type]
        else:
            w = span(self.width) if self.width else "any"
            h = span(self.height) if self.height else "any"
            size = f"width {w}, height {h} px"
        batch = f"batch {self.min_batch}-{self.max_batch}" if self.max_batch is not None else "any batch"
        return f"{size}, {batch}"

    def check_size(self, width: int, height: int) -> None:
        """Raise ``ValidationError`` naming the profile if ``width``x``height`` is outside it."""
        ok = all(span is None or span[0] <= v <= span[1] for v, span in ((width, self.width), (height, self.height)))
        if not ok:
            raise ValidationError(f"size {width}x{height} is outside this engine's profile: {self.describe()}",
                                  field="size")

    def as_dict(self) -> dict[str, object]:
        return {"max_batch": self.max_batch, "min_batch": self.min_batch,
                "width": list(self.width) if self.width else None,
                "height": list(self.height) if self.height else None,
                "sizes": [f"{w}x{h}" for w, h in self.sizes], "profile": self.describe()}


class Backend(ABC):
    """Runs transformer, VAE encoder and VAE decoder on batches.

    Shapes: ``x`` (B, C, h, w) latents; ``timestep``/``guidance`` (B,); ``encoder_hidden_states``
    (B, L, D); ``encoder_attention_mask`` (B, L); images (B, 3, H, W) in [-1, 1].
    """

    name: str = "base"
    #: Whether the first call at a shape is slow (compile, graph capture) and must happen in warm-up.
    needs_warmup: bool = False
    #: Whether each call may run another set of LoRA adapters (``set_loras``); a backend that bakes
    #: the weights into a graph or an engine cannot, and ``create_backend`` refuses it with adapters.
    supports_loras: bool = False

    def __init__(self, components: ModelComponents, options: BackendOptions | None = None) -> None:
        from ditstream.engine.config import BackendOptions

        self.components = components
        #: Profile, cache folder and tiny VAE asked for (``engine.config.BackendOptions``).
        self.options = options if options is not None else BackendOptions()
        #: True once every shape the engine will call has been warmed (the runner sets it).
        self.warm = not self.needs_warmup

    @property
    def limits(self) -> BackendLimits:
        """Batch and size bounds of one call; the default is none (eager torch runs any shape)."""
        return BackendLimits()

    def warmup_batches(self, max_batch: int) -> list[int]:
        """The batch sizes warm-up must run to cover every call up to ``max_batch``."""
        return list(range(1, max_batch + 1))

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    def warmup(self, shapes: list[tuple[int, int, int]]) -> None:  # noqa: B027 - optional hook
        """Prepare for ``(batch, height, width)`` shapes (compile, build graphs); default: nothing."""

    def set_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Run the next ``denoise`` calls with this adapter set (``engine.lora.LoraSet``; empty = base)."""
        if loras:
            raise ValidationError(f"the {self.name} backend cannot switch LoRA adapters per call; "
                                  "serve LoRAs with --backend torch", field="loras")

    def temporal_attention(self) -> TemporalAttention | None:
        """The attention-memory hook of the transformer this backend runs (``engine.temporal``), or
        ``None``: its transformer is a fixed graph (an ONNX export, a TensorRT engine) that cannot take the
        memory. torch runs the hook eagerly; compile traces it with the memory as graph inputs."""
        return None

    @abstractmethod
    def denoise(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        """The raw transformer output for model input ``x`` at SCM timestep ``timestep``."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latents (unscaled: what ``vae.encode(x).latent`` returns)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from unscaled latents."""
