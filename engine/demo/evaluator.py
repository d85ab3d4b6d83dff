"""Reads a shapes image back into (background, colour, shape, centroid) from pixels alone.

Independent of the generator by construction: it uses only the palette and the drawing code of
``engine.demo.dataset``, never a network. Background = median of the border; shape colour = median
of the pixels far from it; coverage α = projection of each pixel on the background→shape colour
line; shape class = the template (drawn by the dataset's own renderer, fitted to the bounding box
of α > ½) with the highest soft IoU. It is checked against ground truth in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from ditstream.engine.demo.dataset import COLOUR_NAMES, COLOURS, SHAPES, shape_mask

_PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
#: A pixel this far (RGB distance) from the background counts as shape when estimating its colour.
FG_DISTANCE = 60.0
_REF_SIZE, _REF_R = 64, 20.0


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees in one image. ``shape``/``colour`` are ``None`` if no shape is found."""

    background: str
    colour: str | None
    shape: str | None
    centroid: tuple[float, float] | None
    #: Fraction of pixels that are clearly background or clearly shape (α < 0.1 or > 0.9): ~0.97 on
    #: real data, low for a blurry mean image.
    sharpness: float
    #: Soft IoU of the best template (how shape-like the blob is).
    fit: float


def nearest_colour(rgb: np.ndarray) -> str:
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, np.float32)[None], axis=1)
    return COLOUR_NAMES[int(d.argmin())]


@cache
def _template_extent(shape: str) -> tuple[float, float, float, float]:
    """Bounding box of α > ½ of a reference drawing, relative to its centre, in radius units."""
    c = _REF_SIZE / 2
    m = shape_mask(shape, c, c, _REF_R, _REF_SIZE) > 0.5
    ys, xs = np.nonzero(m)
    return ((xs.min() - c) / _REF_R, (xs.max() + 1 - c) / _REF_R,
            (ys.min() - c) / _REF_R, (ys.max() + 1 - c) / _REF_R)


def coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(alpha (H, W), background rgb, shape rgb or None)`` for a uint8 ``(H, W, 3)`` image."""
    img = image.astype(np.float32)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    far = dist > FG_DISTANCE
    if far.sum() < 8:
        return np.zeros(img.shape[:2], np.float32), bg, None
    fg = np.median(img[far], axis=0)
    d = fg - bg
    alpha = ((img - bg) @ d) / max(float(d @ d), 1e-6)
    return np.clip(alpha, 0.0, 1.0).astype(np.float32), bg, fg


def classify_shape(alpha: np.ndarray) -> tuple[str | None, float]:
    """Best-fitting shape class for the coverage map and its soft IoU."""
    size = alpha.shape[0]
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) < 8:
        return None, 0.0
    X0, X1, Y0, Y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    best, best_iou = None, -1.0
    for shape in SHAPES:
        x0, x1, y0, y1 = _template_extent(shape)
        r = 0.5 * ((X1 - X0) / (x1 - x0) + (Y1 - Y0) / (y1 - y0))
        cx = 0.5 * ((X0 - x0 * r) + (X1 - x1 * r))
        cy = 0.5 * ((Y0 - y0 * r) + (Y1 - y1 * r))
        t = shape_mask(shape, cx, cy, r, size)
        iou = float(np.minimum(t, alpha).sum() / max(np.maximum(t, alpha).sum(), 1e-6))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def read_image(image: np.ndarray) -> Reading:
    """Evaluate one uint8 ``(H, W, 3)`` image."""
    alpha, bg, fg = coverage(image)
    background = nearest_colour(bg)
    sharp = float(((alpha < 0.1) | (alpha > 0.9)).mean())
    if fg is None:
        return Reading(background, None, None, None, sharp, 0.0)
    shape, fit = classify_shape(alpha)
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
    w = float(alpha.sum())
    centroid = (float((alpha * (xs + 0.5)).sum() / w), float((alpha * (ys + 0.5)).sum() / w))
    return Reading(background, nearest_colour(fg), shape, centroid, sharp, fit)


@dataclass(frozen=True)
class Scores:
    """Agreement of a set of images with their intended (shape, colour, background)."""

    n: int
    colour: float
    shape: float
    background: float
    sharpness: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "colour": self.colour, "shape": self.shape,
                "background": self.background, "sharpness": self.sharpness}


def score(images: np.ndarray | list[np.ndarray], targets: list[tuple[str, str, str]]) -> Scores:
    """``targets`` are ``(shape, colour, background)`` per image."""
    readings = [read_image(np.asarray(im)) for im in images]
    n = len(readings)
    if n == 0:
        raise ValueError("score() needs at least one image")
    col = sum(r.colour == t[1] for r, t in zip(readings, targets)) / n
    shp = sum(r.shape == t[0] for r, t in zip(readings, targets)) / n
    bgr = sum(r.background == t[2] for r, t in zip(readings, targets)) / n
    sharp = float(np.mean([r.sharpness for r in readings]))
    return Scores(n, col, shp, bgr, sharp)
