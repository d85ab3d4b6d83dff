"""The WebSocket wire protocol of ``/v1/stream`` (written out in ``docs/protocol.md``).

Binary messages are frames: a bare image (recognised by its magic bytes) or
``[u32 big-endian header length][JSON header][image bytes]``. Text messages are JSON control
messages, parsed once into validated pydantic models whose errors name the field and the value.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Literal

from ditstream.engine.errors import ImageDecodeError, ValidationError
from ditstream.engine.sizes import parse_size
from ditstream.server.codec import sniff
from ditstream.server.errors import MalformedMessageError, UnknownMessageTypeError
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from pydantic import ValidationError as PydanticValidationError

PROTOCOL_VERSION = 1
#: Largest frame header (JSON) accepted.
MAX_HEADER_BYTES = 4096


# ---------------------------------------------------------------------------------------- framing
def pack_frame(header: dict[str, Any], image: bytes) -> bytes:
    """``[u32 BE length][JSON header][image]`` — every output frame has this form."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + image


def unpack_frame(data: bytes) -> tuple[dict[str, Any] | None, memoryview]:
    """Split a binary message into (header or None for a bare image, image bytes)."""
    view = memoryview(data)
    if sniff(view) is not None:
        return None, view
    n = struct.unpack_from(">I", data)[0] if len(data) >= 4 else -1
    if not 0 < n <= MAX_HEADER_BYTES or 4 + n > len(data) or data[4:5] != b"{":
        raise ImageDecodeError(
            "binary message is neither an image (JPEG/PNG/WebP magic bytes) nor "
            "[u32 header length][JSON header][image]", field="frame")
    try:
        header = json.loads(view[4 : 4 + n].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # "[[[[…" overflows the stack
        raise MalformedMessageError(f"frame header is not valid JSON: {exc}", field="frame") from exc
    if not isinstance(header, dict):
        raise MalformedMessageError("frame header must be a JSON object", field="frame")
    return header, view[4 + n :]


# ---------------------------------------------------------------------------------------- control
class FilterModel(BaseModel):
    """Similarity-filter settings (any subset)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    threshold: float | None = None
    max_skip: int | None = None
    seed: int | None = None
    downscale: int | None = None


class PromptItem(BaseModel):
    """One entry of a prompt blend; weights are checked (≥ 0, one > 0) by the engine's validation."""

    model_config = ConfigDict(extra="forbid")
    text: str
    weight: float = 1.0


class SeedItem(BaseModel):
    """One entry of a seed blend."""

    model_config = ConfigDict(extra="forbid")
    seed: int
    weight: float = 1.0


class ConfigMessage(BaseModel):
    """``{"type":"config", ...}``: any subset of the stream's settings; applied from the next frame."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["config"] = "config"
    #: A string, or a blend ``[{"text": ..., "weight": w}, ...]`` mixed in embedding space.
    prompt: str | list[PromptItem] | None = None
    prompt_interpolation: Literal["linear", "slerp"] | None = None
    mode: Literal["img2img", "txt2img"] | None = None
    steps: int | None = None
    strength: float | None = None
    #: An int, or a blend ``[{"seed": s, "weight": w}, ...]`` (noises slerped).
    seed: int | list[SeedItem] | None = None
    #: Glide to this config over this many output frames (0 = jump).
    transition_frames: int | None = None
    #: Latent feedback f ∈ [0, 1): steadier img2img frames, slower motion response.
    feedback: float | None = None
    #: Attention memory across frames: weight in [0, 1] (0 = off), decay in [0, 1), motion scaling.
    temporal: float | None = None
    temporal_decay: float | None = None
    motion_adaptive: StrictBool | None = None
    #: LoRA adapter scales ``{"name": scale}`` (names left out are off); see ``/v1/models``.
    loras: dict[str, float] | None = None
    size: str | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    timesteps: list[float] | None = None
    filter: FilterModel | None = None
    #: txt2img frames per second pushed by the server.
    fps: float | None = Field(None, gt=0)
    #: Output JPEG quality (a server-side encoding choice, not an engine setting).
    quality: int | None = Field(None, ge=1, le=100)

    def engine_changes(self) -> dict[str, Any]:
        """The ``StreamConfig`` fields this message changes."""
        d = self.model_dump(exclude_none=True, exclude={"type", "size", "fps", "quality", "filter"})
        if self.size is not None:
            d["width"], d["height"] = parse_size(self.size)
        if self.filter is not None:
            d["filter"] = self.filter.model_dump(exclude_none=True)
        if "timesteps" in d:
            d["timesteps"] = tuple(d["timesteps"])
        return d


class PingMessage(BaseModel):
    """``{"type":"ping","ts":...}`` → ``{"type":"pong","ts":...}`` (clock-free round-trip time)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["ping"] = "ping"
    ts: float | None = None


CONTROL_TYPES: dict[str, type[BaseModel]] = {"config": ConfigMessage, "ping": PingMessage}


def parse_control(text: str) -> BaseModel:
    """Text message → a validated control model (typed errors for every failure)."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # deep nesting ("[[[[…") overflows the stack
        raise MalformedMessageError(f"control message is not valid JSON: {exc}", field="message") from exc
    if not isinstance(raw, dict):
        raise MalformedMessageError("control message must be a JSON object", field="message")
    kind = raw.get("type")
    model = CONTROL_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise UnknownMessageTypeError(
            f"unknown control message type {kind!r}; expected one of {sorted(CONTROL_TYPES)}", field="type")
    try:
        return model.model_validate(raw)
    except PydanticValidationError as exc:
        errors = exc.errors()
        # A field typed as a union (prompt: string or list) fails once per member: report the deepest
        # failure of the first field, which is the member the client meant.
        first = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
        err = max(first, key=lambda e: len(_where(e["loc"])))
        where = ".".join(_where(err["loc"])) or "message"
        raise ValidationError(f"{where}: {err['msg']} (got {err.get('input')!r})", field=where) from exc


def _where(loc: tuple) -> list[str]:
    """An error location without pydantic's union-member tags (``str``, ``list[PromptItem]``, ...)."""
    return [str(p) for p in loc if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]


_UNION_TAGS = {"str", "int", "float", "bool"}


def frame_header_fields(header: dict[str, Any] | None) -> tuple[int | None, float | None]:
    """``seq`` and ``ts`` from a frame header (validated: integers/numbers or absent)."""
    if header is None:
        return None, None
    seq, ts = header.get("seq"), header.get("ts")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        raise MalformedMessageError(f"header.seq must be a non-negative integer, got {seq!r}", field="seq")
    if ts is not None and (not isinstance(ts, (int, float)) or isinstance(ts, bool)):
        raise MalformedMessageError(f"header.ts must be a number, got {ts!r}", field="ts")
    return seq, (float(ts) if ts is not None else None)
