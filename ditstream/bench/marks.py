"""Frame numbers drawn into the picture, so they survive a lossy video codec (WebRTC benches and tests).

``stamp(image, n)`` draws ``n`` (16 bits) as two rows of 16 square cells along the top edge: the
first row the bits, black or white, most significant first; the second their complement. ``read``
returns the number, or None when a cell is undecided or the rows disagree (a frame too blurred to
trust, or one that carries no stamp). Cells are 1/16 of the width (32 px at 512), far coarser than
the blocks a codec quantises, so a frame number reads back exactly or not at all.
"""

from __future__ import annotations

import numpy as np

BITS = 16


def _cell(width: int) -> int:
    cell = width // BITS
    if cell < 4:
        raise ValueError(f"an image {width} px wide is too narrow for a {BITS}-bit frame stamp")
    return cell


def stamp(image: np.ndarray, n: int) -> np.ndarray:
    """``image`` (uint8 H×W×3, changed in place and returned) with ``n`` drawn along its top edge."""
    cell = _cell(image.shape[1])
    for i in range(BITS):
        bit = (n >> (BITS - 1 - i)) & 1
        image[:cell, i * cell:(i + 1) * cell] = 255 * bit
        image[cell:2 * cell, i * cell:(i + 1) * cell] = 255 * (1 - bit)
    return image


def read(image: np.ndarray) -> int | None:
    """The frame number ``stamp`` drew into ``image`` (decoded, possibly lossy), or None."""
    cell = _cell(image.shape[1])
    if image.shape[0] < 2 * cell:
        return None
    q = cell // 4  # the middle half of every cell: edges bleed under chroma subsampling and filtering
    n = 0
    for i in range(BITS):
        x = i * cell
        top = float(image[q:cell - q, x + q:x + cell - q].mean())
        bottom = float(image[cell + q:2 * cell - q, x + q:x + cell - q].mean())
        if abs(top - bottom) < 96:  # undecided, or both rows alike: no stamp here
            return None
        n = (n << 1) | (top > bottom)
    return n
