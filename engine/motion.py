"""How much the input moves, per frame, and how much memory that leaves room for (``motion_adaptive``).

Memory across frames (``temporal``, ``feedback``) steadies a still picture and drags a moving one:
the output trails the input (ghosting). With ``motion_adaptive`` the engine measures each input's
motion and scales the memory's weight, and ``feedback``, by ``motion_scale``: full for a still scene,
none for fast motion. The measure is cheap and model-free: the mean absolute difference, in grey
levels (0–255), between a small grey thumbnail (box-averaged to ``CELLS``² cells, which also
averages sensor noise away) of this input and of the stream's previous one.
"""

from __future__ import annotations

import numpy as np

#: Thumbnail side in cells: sensor noise of σ grey levels shrinks to about σ·CELLS/side.
CELLS = 8
#: Up to this motion (grey levels) the memory keeps its full weight: σ 10 sensor noise on a still
#: 64² scene measures 0.7–0.9 (``docs/demo_model_card.md``).
MOTION_LOW = 1.0
#: From this motion on the memory is off for the frame: the demo clips' circle measures 2.5 at 1 px
#: per frame (weight ½), 6.4 at 3 px and 12 at 6 px (off).
MOTION_HIGH = 4.0


def thumbnail(image: np.ndarray, cells: int = CELLS) -> np.ndarray:
    """A (H, W, 3) image (uint8, or float in [0, 1]) → (≤cells, ≤cells) float32 grey, box-averaged."""
    grey = image.astype(np.float32).mean(axis=2)
    if image.dtype != np.uint8:
        grey *= 255.0
    h, w = grey.shape
    ky, kx = max(1, h // cells), max(1, w // cells)
    ny, nx = h // ky, w // kx
    return grey[: ny * ky, : nx * kx].reshape(ny, ky, nx, kx).mean(axis=(1, 3))


def motion_scale(motion: float, low: float = MOTION_LOW, high: float = MOTION_HIGH) -> float:
    """1 at or below ``low`` grey levels, 0 at or above ``high``, linear in between."""
    if motion <= low:
        return 1.0
    if motion >= high:
        return 0.0
    return (high - motion) / (high - low)


class MotionMeter:
    """One stream's motion measure: the last input's thumbnail, compared with the next (engine thread)."""

    def __init__(self) -> None:
        self.last: np.ndarray | None = None

    def measure(self, image: np.ndarray) -> float:
        """Mean absolute thumbnail difference to the previous input (0 for the first, or after a size change)."""
        small = thumbnail(image)
        last, self.last = self.last, small
        if last is None or last.shape != small.shape:
            return 0.0
        return float(np.abs(small - last).mean())
