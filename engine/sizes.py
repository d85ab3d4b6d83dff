"""``WxH`` image sizes: the one parser for the wire protocol, REST, every command and the benches.

Light on purpose (no torch): the commands parse their arguments with it before anything heavy loads.
"""

from __future__ import annotations

import re

from ditstream.engine.errors import ValidationError

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_SIDE_RE = re.compile(r"^\s*(\d{1,5})\s*$")


def parse_size(text: str, *, square: bool = False) -> tuple[int, int]:
    """``"768x512"`` → (768, 512) (width × height); with ``square``, ``"512"`` means 512x512 as well.

    Raises ``ValidationError`` (field ``size``) for anything else, a zero side included.
    """
    m = _SIZE_RE.match(text)
    if m:
        w, h = int(m.group(1)), int(m.group(2))
    elif square and (m := _SIDE_RE.match(text)):
        w = h = int(m.group(1))
    else:
        form = "'512' or '768x512'" if square else "'512x512'"
        raise ValidationError(f"size must look like {form} (width x height), got {text!r}", field="size")
    if w == 0 or h == 0:
        raise ValidationError(f"size must be positive, got {text!r}", field="size")
    return w, h
