"""Procedural coloured-shape images with captions, deterministic by seed (no download).

Why procedural: the demo model must be reproducible from scratch offline, and an evaluator that
knows the generating process can score generated images without any learned judge. Images are
drawn at 4× resolution with PIL and box-filtered down, so edges are anti-aliased like a photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Palette (RGB). Chosen far apart so that a colour is unambiguous by nearest-neighbour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 60, 190),
    "cyan": (40, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
#: Inner/outer radius of a ring; the evaluator's templates use the same ratio.
RING_INNER = 0.55
#: Inner/outer radius of the star's concave vertices.
STAR_INNER = 0.45
#: Square half-side relative to the shape's radius (so all shapes have similar extent).
SQUARE_HALF = 0.8
#: Shape radius range as a fraction of the image side.
RADIUS_RANGE = (0.16, 0.30)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One image: shape class, colours, centre ``(cx, cy)`` and radius in pixels of a ``size`` image."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float
    size: int = 64

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.background)


def caption_for(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour ≠ background: 5 × 8 × 7 = 280 captions."""
    return [(s, c, b) for s in SHAPES for c in COLOUR_NAMES for b in COLOUR_NAMES if c != b]


def vocabulary() -> list[str]:
    """The tokenizer's words: the caption template plus every shape and colour name."""
    return ["a", "on", "background", *COLOUR_NAMES, *SHAPES]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices (image coordinates, y down) for polygonal shapes; ``None`` for round ones."""
    if shape == "square":
        h = SQUARE_HALF * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            a = np.deg2rad(-90.0 + 36.0 * k)
            rr = r if k % 2 == 0 else STAR_INNER * r
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    return None


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape ``(size, size)`` float32."""
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(img)
    # Pixel centres are at +0.5: scale the continuous coordinates accordingly.
    X, Y, R = cx * s, cy * s, r * s
    poly = shape_polygon(shape, X, Y, R)
    if poly is not None:
        draw.polygon(poly, fill=255)
    elif shape in ("circle", "ring"):
        draw.ellipse([X - R, Y - R, X + R, Y + R], fill=255)
        if shape == "ring":
            ri = RING_INNER * R
            draw.ellipse([X - ri, Y - ri, X + ri, Y + ri], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def render(spec: ShapeSpec) -> np.ndarray:
    """The image of ``spec`` as uint8 ``(H, W, 3)``."""
    m = shape_mask(spec.shape, spec.cx, spec.cy, spec.radius, spec.size)[..., None]
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    bg = np.asarray(COLOURS[spec.background], dtype=np.float32)
    return np.clip(np.rint(m * fg + (1.0 - m) * bg), 0, 255).astype(np.uint8)


def random_geometry(rng: np.random.Generator, size: int = 64) -> tuple[float, float, float]:
    """Radius and a centre that keeps the whole shape inside the frame."""
    r = float(rng.uniform(*RADIUS_RANGE)) * size
    margin = r + 1.0
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    return cx, cy, r


def random_spec(rng: np.random.Generator, size: int = 64) -> ShapeSpec:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    others = [c for c in COLOUR_NAMES if c != colour]
    background = others[int(rng.integers(len(others)))]
    cx, cy, r = random_geometry(rng, size)
    return ShapeSpec(shape, colour, background, cx, cy, r, size)


def make_dataset(n: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, list[ShapeSpec]]:
    """``n`` random images ``(n, H, W, 3)`` uint8 and their specs; same seed → same data."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, size) for _ in range(n)]
    images = np.stack([render(s) for s in specs]) if specs else np.zeros((0, size, size, 3), np.uint8)
    return images, specs


def moving_shape_video(n_frames: int, spec: ShapeSpec, *, radius_path: float = 12.0) -> tuple[np.ndarray, list[ShapeSpec]]:
    """A synthetic clip: ``spec``'s shape moving on a circle of ``radius_path`` px around the centre.

    Used for the img2img check (the output must follow the input's position).
    """
    size = spec.size
    frames, specs = [], []
    for k in range(n_frames):
        a = 2 * np.pi * k / max(n_frames, 1)
        cx = size / 2 + radius_path * np.cos(a)
        cy = size / 2 + radius_path * np.sin(a)
        s = ShapeSpec(spec.shape, spec.colour, spec.background, cx, cy, spec.radius, size)
        frames.append(render(s))
        specs.append(s)
    return np.stack(frames), specs


def true_centroid(spec: ShapeSpec) -> tuple[float, float]:
    """Centroid of the shape's coverage (pixel-centre coordinates, x then y)."""
    m = shape_mask(spec.shape, spec.cx, spec.cy, spec.radius, spec.size)
    ys, xs = np.mgrid[0 : spec.size, 0 : spec.size]
    w = m.sum()
    return float((m * (xs + 0.5)).sum() / w), float((m * (ys + 0.5)).sum() / w)
