"""Image ↔ tensor conversions, matching diffusers' ``VaeImageProcessor`` arithmetic exactly."""

from __future__ import annotations

import numpy as np
import torch
from ditstream.engine.errors import ValidationError


def check_image(image: np.ndarray, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Validate a uint8 (H, W, 3) RGB array, optionally of a given size."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValidationError(
            f"frame must be a uint8 RGB array of shape (H, W, 3), got {getattr(image, 'dtype', type(image))} "
            f"{getattr(image, 'shape', '')}", field="image")
    if width is not None and height is not None and image.shape[:2] != (height, width):
        raise ValidationError(
            f"frame is {image.shape[1]}x{image.shape[0]} but the stream is configured for {width}x{height}",
            field="size")
    return image


def to_tensor(images: list[np.ndarray], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (H, W, 3) arrays → (B, 3, H, W) in [-1, 1] (``x/255·2 − 1`` as diffusers computes it)."""
    arr = np.stack(images).astype(np.float32) / 255.0
    t = torch.from_numpy(arr).permute(0, 3, 1, 2)
    t = 2.0 * t - 1.0
    return t.to(device=device, dtype=dtype)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] → (B, H, W, 3) float32 in [0, 1] on the CPU, as diffusers post-processes."""
    return (images / 2 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu()


def to_uint8(unit: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8 with diffusers' rounding."""
    arr = unit.numpy() if isinstance(unit, torch.Tensor) else unit
    return (arr * 255).round().astype(np.uint8)
