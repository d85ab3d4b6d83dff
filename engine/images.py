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
    """uint8 (H, W, 3) arrays → (B, 3, H, W) in [-1, 1] (``x/255·2 − 1`` as diffusers computes it).

    The same float32 operations in the same order, done in place in the one buffer this allocates:
    every frame of every stream passes here, and on a CPU a full-size allocation costs more than
    the arithmetic."""
    arr = np.empty((len(images), *images[0].shape), dtype=np.float32)
    for i, image in enumerate(images):
        arr[i] = image
    np.divide(arr, np.float32(255.0), out=arr)
    t = torch.from_numpy(arr).permute(0, 3, 1, 2)
    t.mul_(2.0).sub_(1.0)
    return t.to(device=device, dtype=dtype)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] → (B, H, W, 3) float32 in [0, 1] on the CPU, as diffusers post-processes
    (in place in one new tensor: ``images`` is left as it is)."""
    unit = images / 2
    unit.add_(0.5).clamp_(0, 1)
    return unit.float().permute(0, 2, 3, 1).cpu()


def to_uint8(unit: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8 with diffusers' rounding."""
    arr = unit.numpy() if isinstance(unit, torch.Tensor) else unit
    scaled = arr * 255  # the one float copy (``unit`` is left as it is), rounded in place
    np.round(scaled, out=scaled)
    return scaled.astype(np.uint8)
