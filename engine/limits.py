"""What an engine accepts, as one typed value, and the one function that checks a stream config against it.

Every ``EngineClient`` has ``limits`` (an ``EngineLimits``): the in-process runner derives them from its
core and backend, the Redis gateway from what its workers advertise in their heartbeat. The server
validates a config once, at its edge and before anything is queued (``AppState.validate`` →
``validate_stream``); the layers below take it on trust. ``validate_stream`` leaves a receipt for the
config it passed, and the engine's entry points (runner, core) call ``ensure_valid``, which looks the
receipt up instead of checking again: only a config that never passed an edge (a library caller, a
test, a bench) is validated there. The core keeps that guard because a config outside the limits
would not fail alone: it would break the batched model call of every stream it shares a tick with.

The input check of a frame or job (``check_input``: "img2img needs an image", the frame's size) is
the other half: it needs the image, so it runs where the image arrives.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ditstream.engine.backends.base import BackendLimits, Span
from ditstream.engine.config import DEFAULT_SIZE_MULTIPLE, StreamConfig
from ditstream.engine.errors import ValidationError

if TYPE_CHECKING:
    import numpy as np

#: Configs remembered as validated (a few per live stream: its open and its recent reconfigures).
MAX_RECEIPTS = 4096


@dataclass(frozen=True)
class EngineLimits:
    """Everything a stream config is checked against, typed (no ``info`` dict to read keys from).

    ``profile`` is the backend's size and batch profile (unbounded for eager torch and the null engine);
    ``loras`` the names of the loaded adapters (a config naming another is refused); ``max_batch`` and
    ``inbox_depth`` are how many samples one model call takes and how many frames a stream keeps
    pending (reported, not checked per config).
    """

    size_multiple: int = DEFAULT_SIZE_MULTIPLE
    max_pixels: int = 1024 * 1024
    max_prompt_chars: int = 2000
    profile: BackendLimits = field(default_factory=BackendLimits)
    loras: tuple[str, ...] = ()
    max_batch: int = 16
    inbox_depth: int = 2
    #: Why ``temporal`` > 0 (attention memory) is refused, naming the backend or the attention
    #: processor (``engine.temporal``); ``None``: carried.
    temporal_refusal: str | None = None

    def tightened(self, *, max_pixels: int, max_prompt_chars: int) -> EngineLimits:
        """These limits bounded by a server's own (an injected engine may allow more than the server)."""
        return replace(self, max_pixels=min(self.max_pixels, max_pixels),
                       max_prompt_chars=min(self.max_prompt_chars, max_prompt_chars))

    def narrowed(self, other: EngineLimits) -> EngineLimits:
        """What both accept (a fleet's workers, any of which may take a config): the stricter bound of
        each, the sizes both profiles hold, the LoRA names both loaded."""
        mult = self.size_multiple * other.size_multiple // math.gcd(self.size_multiple, other.size_multiple)
        profile = BackendLimits(max_batch=_least(self.profile.max_batch, other.profile.max_batch),
                                min_batch=max(self.profile.min_batch, other.profile.min_batch),
                                width=_overlap(self.profile.width, other.profile.width),
                                height=_overlap(self.profile.height, other.profile.height),
                                sizes=tuple(s for s in self.profile.sizes if s in other.profile.sizes))
        return EngineLimits(size_multiple=mult, max_pixels=min(self.max_pixels, other.max_pixels),
                            max_prompt_chars=min(self.max_prompt_chars, other.max_prompt_chars),
                            profile=profile, loras=tuple(sorted(set(self.loras) & set(other.loras))),
                            max_batch=min(self.max_batch, other.max_batch),
                            inbox_depth=min(self.inbox_depth, other.inbox_depth),
                            temporal_refusal=self.temporal_refusal or other.temporal_refusal)

    def covers(self, other: EngineLimits) -> bool:
        """Whether every config valid under ``other`` is valid under these (``other`` is as strict or stricter)."""
        return (other.size_multiple % self.size_multiple == 0 and other.max_pixels <= self.max_pixels
                and other.max_prompt_chars <= self.max_prompt_chars and set(other.loras) <= set(self.loras)
                and _within(other.profile.width, self.profile.width)
                and _within(other.profile.height, self.profile.height)
                and (self.temporal_refusal is None or other.temporal_refusal is not None))

    def fits_profile(self, width: int, height: int) -> bool:
        """Whether ``width``x``height`` is inside the backend's profile (the check ``validate_stream`` makes)."""
        try:
            self.profile.check_size(width, height)
        except ValidationError:
            return False
        return True


def _least(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _overlap(a: Span | None, b: Span | None) -> Span | None:
    """The span both allow (``None``: unbounded); an empty overlap is a span no size fits."""
    if a is None or b is None:
        return b if a is None else a
    return (max(a[0], b[0]), min(a[1], b[1]))


def _within(inner: Span | None, outer: Span | None) -> bool:
    if outer is None:
        return True
    return inner is not None and outer[0] <= inner[0] and inner[1] <= outer[1]


class _Receipts:
    """Configs ``validate_stream`` passed, with the limits they passed (bounded, oldest forgotten first).

    Keyed by value: a reconfigure that rebuilds an equal config (``replace(**cfg.fields())``) finds the
    receipt of the one the edge validated. Called from the event loop, codec threads and the engine
    thread, hence the lock.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: OrderedDict[StreamConfig, EngineLimits] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, cfg: StreamConfig, limits: EngineLimits) -> None:
        try:
            hash(cfg)
        except TypeError:  # a field of an unhashable type: nothing to remember it by (it is checked each time)
            return
        with self._lock:
            self._seen[cfg] = limits
            self._seen.move_to_end(cfg)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)

    def passed(self, cfg: StreamConfig, limits: EngineLimits) -> bool:
        try:
            with self._lock:
                seen = self._seen.get(cfg)
        except TypeError:
            return False
        return seen is not None and limits.covers(seen)


_receipts = _Receipts(MAX_RECEIPTS)


def validate_stream(cfg: StreamConfig, limits: EngineLimits) -> StreamConfig:
    """THE check of a stream (or job) config: every field, the size multiple, pixel and prompt bounds,
    the backend's profile, the LoRA names and attention memory. Raises ``ValidationError`` naming the field; returns ``cfg``."""
    from ditstream.engine.lora import resolve_set

    cfg.validate(max_prompt_chars=limits.max_prompt_chars, max_pixels=limits.max_pixels,
                 size_multiple=limits.size_multiple)
    limits.profile.check_size(cfg.width, cfg.height)
    resolve_set(cfg.lora_scales, dict.fromkeys(limits.loras, 1.0))  # refuses unknown names
    if cfg.temporal > 0 and limits.temporal_refusal is not None:
        raise ValidationError(limits.temporal_refusal, field="temporal")
    _receipts.add(cfg, limits)
    return cfg


def ensure_valid(cfg: StreamConfig, limits: EngineLimits) -> StreamConfig:
    """``cfg`` as it is when an edge already validated it under limits at least as strict as ``limits``;
    else ``validate_stream(cfg, limits)``. What the engine's entry points call instead of checking again."""
    if _receipts.passed(cfg, limits):
        return cfg
    return validate_stream(cfg, limits)


def check_input(cfg: StreamConfig, image: np.ndarray | None) -> None:
    """THE check of what a frame or job brings for ``cfg``: an image of the configured size, or none
    for txt2img (img2img needs one). Raises ``ValidationError`` naming ``image`` or ``size``."""
    if image is not None:
        from ditstream.engine.images import check_image

        check_image(image, cfg.width, cfg.height)
    elif cfg.mode == "img2img":
        raise ValidationError("img2img needs an input image", field="image")
