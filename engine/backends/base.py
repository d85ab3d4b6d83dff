"""The one interface every backend implements.

A backend runs the three networks of a SANA-Sprint pipeline on batches. It owns no sampling math
(that is ``engine.sampler``) and no stream state: inputs and outputs are plain tensors, so that
``torch``, ``compile``, ``onnx`` and ``tensorrt`` are interchangeable and parity-tested against
``torch``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from ditstream.engine.loader import ModelComponents


class Backend(ABC):
    """Runs transformer, VAE encoder and VAE decoder on batches.

    Shapes: ``x`` (B, C, h, w) latents; ``timestep``/``guidance`` (B,); ``encoder_hidden_states``
    (B, L, D); ``encoder_attention_mask`` (B, L); images (B, 3, H, W) in [-1, 1].
    """

    name: str = "base"

    def __init__(self, components: ModelComponents) -> None:
        self.components = components

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    def warmup(self, shapes: list[tuple[int, int, int]]) -> None:  # noqa: B027 - optional hook
        """Prepare for ``(batch, height, width)`` shapes (compile, build graphs); default: nothing."""

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
