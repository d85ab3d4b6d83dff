"""Image decode/encode for the wire: magic-byte sniffing, size checks before decoding, fast codecs.

Decoding is ``engine/imagefile.py``'s ``decode`` (re-exported here): the header is read first so that
an image over the pixel limit is refused before a single pixel is decoded (decompression bombs), and
whatever the decoders raise becomes ``ImageDecodeError``. These functions are blocking: the server
calls them in its codec thread pool (``Codec``), never on the event loop.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import simplejpeg
from ditstream.engine.imagefile import FORMATS, ImageFormat, decode, sniff
from PIL import Image

__all__ = ["FORMATS", "MIME", "Codec", "ImageFormat", "decode", "encode", "resize", "sniff"]

logger = logging.getLogger(__name__)

MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def encode(image: np.ndarray, fmt: ImageFormat = "jpeg", quality: int = 85) -> bytes:
    """uint8 (H, W, 3) RGB → image bytes."""
    if fmt == "jpeg":
        return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
    buf = io.BytesIO()
    im = Image.fromarray(image)
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=1)
    else:
        im.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize (REST edits accept any image and fit it to the requested size)."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), dtype=np.uint8)


class Codec:
    """A small thread pool so decode/encode never run on the event loop."""

    def __init__(self, threads: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ditstream-codec")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
