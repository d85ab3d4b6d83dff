"""A prompt or seed blend: its entries as they come off the wire, and their one check.

A blend is normalised by the sum of its weights (``engine.sampler``), so the check is about that sum
too: every weight finite and >= 0, one > 0, and their sum finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ditstream.engine.errors import ValidationError

#: Most entries in a prompt or seed blend (bounds the encoder calls and noise draws of one config).
MAX_BLEND = 8


@dataclass(frozen=True)
class WeightedPrompt:
    """One entry of a prompt blend: ``{"text": ..., "weight": w}`` on the wire."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class WeightedSeed:
    """One entry of a seed blend: ``{"seed": s, "weight": w}`` on the wire."""

    seed: int
    weight: float = 1.0


def blend_entries(value: Any, kind: type, key: str, name: str) -> Any:
    """A list of dicts (JSON) or of ``kind`` → a tuple of ``kind``; anything else is left for ``validate``."""
    if not isinstance(value, (list, tuple)):
        return value
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, kind):
            out.append(entry)
            continue
        if not isinstance(entry, dict) or key not in entry or set(entry) - {key, "weight"}:
            raise ValidationError(f"{name}[{i}] must be an object {{{key!r}: ..., 'weight': w}}, got {entry!r}",
                                  field=name)
        out.append(kind(entry[key], entry.get("weight", 1.0)))
    return tuple(out)


def check_weights(entries: tuple, name: str) -> None:
    if not entries:
        raise ValidationError(f"{name} list is empty; give at least one entry", field=name)
    if len(entries) > MAX_BLEND:
        raise ValidationError(f"{name} list has {len(entries)} entries; the limit is {MAX_BLEND}", field=name)
    for i, e in enumerate(entries):
        w = e.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValidationError(f"{name}[{i}].weight must be a finite number >= 0, got {w!r}", field=name)
    if not any(e.weight > 0 for e in entries):
        raise ValidationError(f"{name} weights are all zero; at least one must be > 0", field=name)
    if not math.isfinite(sum(e.weight for e in entries)):  # blends are normalised by the sum
        raise ValidationError(f"{name} weights sum past the largest float; they are relative: scale them down",
                              field=name)
