"""The one decode helper for image files: magic-byte sniffing, the pixel limit checked on the header
before any pixel is decoded (decompression bombs), and every decoder exception mapped to
``ImageDecodeError``.

JPEG goes through simplejpeg (libjpeg-turbo, releases the GIL); PNG and WebP through Pillow, whose
``Image.open`` is lazy (it reads the header only). The server's REST and WebSocket paths
(``server/codec.py``), the Redis wire (``server/scale/messages.py``) and ``ditstream generate --image`` all
decode through ``decode`` here.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Literal

import numpy as np
import simplejpeg
from ditstream.engine.errors import ImageDecodeError, ImageTooLargeError, ValidationError
from PIL import Image

ImageFormat = Literal["jpeg", "png", "webp"]
FORMATS: tuple[str, ...] = ("jpeg", "png", "webp")

#: What the decoders raise for bytes that are not a readable image. Pillow: ``UnidentifiedImageError``
#: (an ``OSError``), ``OSError`` for truncated data, ``SyntaxError``/``ValueError``/``struct.error``/
#: ``EOFError``/``IndexError`` from plugins, ``zlib.error``; simplejpeg: ``ValueError``/``RuntimeError``.
#: ``DecompressionBombError``/``DecompressionBombWarning`` (the latter raised only when warnings are
#: errors) mean "too many pixels" and are caught before these.
DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, zlib.error, RuntimeError,
)
_BOMB_ERRORS: tuple[type[BaseException], ...] = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def sniff(data: bytes | memoryview) -> ImageFormat | None:
    """The image format from its magic bytes, or ``None``."""
    head = bytes(data[:12])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """``ImageTooLargeError`` when ``width``×``height`` is over ``max_pixels``."""
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", field="image")


def _check_size(width: int, height: int, size: tuple[int, int] | None) -> None:
    if size is not None and (width, height) != size:
        raise ValidationError(
            f"frame is {width}x{height} but the stream is configured for {size[0]}x{size[1]}", field="size")


def pixel_limit(max_pixels: int) -> int:
    """The limit ``decode`` applies: ``max_pixels``, or Pillow's ``MAX_IMAGE_PIXELS`` when that is lower.

    Pillow warns over its limit (an error where warnings are errors) and refuses twice it; taking the
    lower of the two for every format makes the answer the same whatever the warnings filter says.
    """
    pil = Image.MAX_IMAGE_PIXELS
    return max_pixels if pil is None else min(max_pixels, int(pil))


def check_header(data: bytes | memoryview, *, max_pixels: int,
                 size: tuple[int, int] | None = None) -> tuple[ImageFormat, int, int]:
    """(format, width, height) from the header alone, with ``decode``'s checks and errors; no pixel is
    decoded. For bytes that are relayed as they are (the gateway passes JPEG through untouched).

    Checks what ``decode`` checks before decoding (magic bytes, header, pixel limit, ``size``); a
    corrupt body behind a sound header is found by whoever decodes it.
    """
    limit = pixel_limit(max_pixels)
    fmt = sniff(data)
    if fmt is None:
        raise ImageDecodeError("not a JPEG, PNG or WebP image (unrecognised magic bytes)", field="image")
    try:
        if fmt == "jpeg":
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        else:
            with Image.open(io.BytesIO(bytes(data)), formats=[fmt.upper()]) as im:
                w, h = im.width, im.height
    except _BOMB_ERRORS as exc:
        raise ImageTooLargeError(f"image has too many pixels (the limit is {limit}): {exc}",
                                 field="image") from exc
    except DECODER_ERRORS as exc:
        raise ImageDecodeError(f"corrupt {fmt.upper()} image: {type(exc).__name__}: {exc}", field="image") from exc
    check_pixels(w, h, limit)
    _check_size(w, h, size)
    return fmt, w, h


def decode(data: bytes | memoryview, *, max_pixels: int, size: tuple[int, int] | None = None,
           fast: bool = False) -> np.ndarray:
    """Bytes → uint8 (H, W, 3) RGB.

    ``size`` = (width, height): with it, an image of another size is an error (streams), never a
    silent resize. ``fast`` trades a little JPEG accuracy for ~40 % less decode time (live
    streams: the model re-renders the frame anyway). Raises ``ImageTooLargeError`` when the header
    claims more than ``pixel_limit(max_pixels)`` (nothing decoded), ``ImageDecodeError`` for non-images and
    corrupt data (whatever the decoder raised), ``ValidationError`` for a size other than ``size``.
    """
    fmt, _, _ = check_header(data, max_pixels=max_pixels, size=size)  # nothing decoded before this passes
    try:
        if fmt == "jpeg":
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast)
        with Image.open(io.BytesIO(bytes(data)), formats=[fmt.upper()]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except _BOMB_ERRORS as exc:  # Pillow's own limit (cannot happen past check_header; kept as a guard)
        raise ImageTooLargeError(f"image has too many pixels: {exc}", field="image") from exc
    except DECODER_ERRORS as exc:
        raise ImageDecodeError(f"corrupt {fmt.upper()} image: {type(exc).__name__}: {exc}", field="image") from exc
