"""Image ↔ tensor conversions, matching diffusers' ``VaeImageProcessor`` arithmetic exactly."""

from __future__ import annotations

from typing import Literal

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


def transfer(tensor: torch.Tensor, device: torch.device | str, direction: Literal["up", "down"]) -> torch.Tensor:
    """Move ``tensor`` to ``device`` (``up``: host to engine device; ``down``: back to the host): the one
    place frames cross between host and device.

    Every image upload (``to_tensor``) and download (``to_host_uint8``, ``to_unit``) goes through
    this module-level function, so a test can count the bytes that cross per frame by replacing it
    (``tests/test_frame_bytes.py``). On the CPU it is a no-op and the count is what a GPU would move."""
    return tensor.to(device)


def to_tensor(images: list[np.ndarray], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (H, W, 3) arrays → (B, 3, H, W) in [-1, 1] (``x/255·2 − 1`` as diffusers computes it).

    The frames cross to ``device`` as uint8 (a quarter of float32's bytes) and are normalised there,
    in float32, with diffusers' operations in diffusers' order (bit-identical to normalising on the
    host), in place in the one float buffer this allocates. The result is a channels-last view."""
    u8 = torch.from_numpy(np.stack(images) if len(images) > 1 else np.ascontiguousarray(images[0])[None])
    t = transfer(u8, device, "up").permute(0, 3, 1, 2).to(torch.float32)
    t.div_(255.0).mul_(2.0).sub_(1.0)
    return t.to(dtype)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] → (B, H, W, 3) float32 in [0, 1] on the CPU, as diffusers post-processes
    (in place in one new tensor: ``images`` is left as it is). Downloads floats: for parity checks
    and one-off generation; the stream path uses ``to_host_uint8``."""
    return transfer(_unit_on_device(images), "cpu", "down")


def to_host_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] → (B, H, W, 3) uint8 on the host, rounded on the device.

    The same operations as ``to_uint8(to_unit(images))`` in the same order and precision (the unit
    image in float32, ``·255``, round half to even, truncate to uint8), so the result is bit-identical;
    only uint8 crosses back (a quarter of float32's bytes), laid out (H, W, 3) contiguous."""
    unit = _unit_on_device(images)
    unit.mul_(255).round_()
    return transfer(unit.to(torch.uint8).contiguous(), "cpu", "down").numpy()


def _unit_on_device(images: torch.Tensor) -> torch.Tensor:
    """``images / 2 + 0.5`` clamped to [0, 1] in the decoder's dtype, then float32 (B, H, W, 3), on its device."""
    unit = images / 2
    unit.add_(0.5).clamp_(0, 1)
    return unit.float().permute(0, 2, 3, 1)


def to_uint8(unit: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8 with diffusers' rounding."""
    arr = unit.numpy() if isinstance(unit, torch.Tensor) else unit
    scaled = arr * 255  # the one float copy (``unit`` is left as it is), rounded in place
    np.round(scaled, out=scaled)
    return scaled.astype(np.uint8)
