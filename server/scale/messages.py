"""Every message that crosses Redis between the gateway and the workers, versioned and typed.

Messages are pydantic models serialised as JSON in the ``m`` field of a stream entry; image pixels
ride beside them as raw bytes in an ``img`` field (never base64, never pickle), described by an
``ImageMeta``. A reader refuses a message whose ``v`` it does not know, so a mixed fleet during a
rolling upgrade fails loudly instead of misreading. Redis key names live here too (``Keys``), so
the gateway, the workers, the janitor and the tests agree on one layout. The wire version is in
every key name, so builds that cannot read each other's messages do not share a job stream.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from ditstream.engine.config import FilterConfig, StreamConfig
from ditstream.engine.errors import DitstreamError, GenerationError
from ditstream.engine.limits import EngineLimits
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

#: Version of every message below; bump on an incompatible change. It is also part of every Redis
#: key (``Keys``): a gateway and a worker of different versions never see each other's streams, so a
#: rolling upgrade runs the new fleet beside the old one on the same Redis and drains the old.
#: 2: session epochs and workers on frames and outputs, encoded stream outputs, gateway liveness.
#: 3: errors by class with their details (``ErrorInfo``); workers advertise their limits (``Heartbeat``).
WIRE_VERSION = 3

Codec = Literal["raw", "jpeg", "png", "webp"]


class WireError(DitstreamError):
    """A Redis message that cannot be read (unknown version, missing field, bad image)."""

    error_type = "internal_error"


class Msg(BaseModel):
    """Base of all messages: frozen, versioned, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    v: int = WIRE_VERSION

    def dump(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def load(cls, raw: bytes | str) -> Any:
        msg = cls.model_validate_json(raw)
        if msg.v != WIRE_VERSION:
            raise WireError(f"{cls.__name__} version {msg.v}; this build speaks {WIRE_VERSION}")
        return msg


# ------------------------------------------------------------------------------------ images
class ImageMeta(Msg):
    """How the ``img`` bytes beside a message encode an (H, W, 3) uint8 image."""

    codec: Codec
    width: int
    height: int
    #: JPEG quality it was coded at (0: unknown or not JPEG): the gateway relays a JPEG of the quality
    #: its client asked for as it is.
    quality: int = 0


def encode_image(image: np.ndarray, codec: Codec = "raw", quality: int = 90) -> tuple[ImageMeta, bytes]:
    """uint8 (H, W, 3) → (meta, bytes). ``raw`` costs a copy; ``jpeg`` cuts bytes ~20× between machines."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    if codec == "raw":
        return ImageMeta(codec=codec, width=w, height=h), img.tobytes()
    from ditstream.server import codec as coder  # the server's one encoder (JPEG 4:2:0, fast PNG, WebP)

    data = coder.encode(img, codec, quality)
    return ImageMeta(codec=codec, width=w, height=h, quality=0 if codec == "png" else quality), data


def decode_image(meta: ImageMeta, data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """(meta, bytes) → uint8 (H, W, 3).

    ``meta`` over ``max_pixels`` raises ``ImageTooLargeError``; encoded bytes go through the one decode
    helper (``engine/imagefile.py``) with their header checked against ``meta`` before any pixel is
    decoded, so a lying or corrupt image raises ``ImageDecodeError``/``ValidationError``, never a
    decoder's own exception. A raw image of the wrong length raises ``WireError``.
    """
    from ditstream.engine.imagefile import check_pixels, decode

    if max_pixels is not None:
        check_pixels(meta.width, meta.height, max_pixels)
    if meta.codec == "raw":
        if len(data) != meta.width * meta.height * 3:
            raise WireError(f"raw image is {len(data)} bytes, expected {meta.width}x{meta.height}x3")
        return np.frombuffer(data, dtype=np.uint8).reshape(meta.height, meta.width, 3).copy()
    return decode(data, max_pixels=meta.width * meta.height, size=(meta.width, meta.height))


# ------------------------------------------------------------------------------------ configs
def config_to_wire(cfg: StreamConfig) -> dict[str, Any]:
    """A ``StreamConfig`` as plain JSON data (no derived ``size`` key)."""
    d = cfg.to_dict()
    d.pop("size", None)
    return d


def config_from_wire(d: dict[str, Any]) -> StreamConfig:
    d = dict(d)
    filt = d.pop("filter", None) or {}
    if d.get("timesteps") is not None:
        d["timesteps"] = tuple(d["timesteps"])
    return StreamConfig(**d, filter=FilterConfig(**filt))


# ------------------------------------------------------------------------------------ errors
def _error_classes() -> dict[str, type[DitstreamError]]:
    """Every class of the one error table (``server/errors.py``) by name: the name is the table's key
    on the wire, since codes are shared (``ImageTooLargeError`` and ``ImageDecodeError`` are both
    ``invalid_image`` but answer 413 and 400)."""
    from ditstream.server.errors import all_error_classes

    classes = all_error_classes()
    by_name = {c.__name__: c for c in classes}
    if len(by_name) != len(classes):
        raise RuntimeError("two error classes share a name; the wire could not tell them apart")
    return by_name


ERROR_CLASSES: dict[str, type[DitstreamError]] = _error_classes()


class ErrorInfo(Msg):
    """A ``DitstreamError`` as data: its class (by name, from the one error table), its code and every
    detail it needs (``DitstreamError.details``), so the gateway re-raises the error the worker raised
    and its client gets the same HTTP status, in-band code, ``Retry-After`` and ``field``."""

    error: str
    code: str
    message: str
    field: str | None = None
    retry_after: float | None = None
    reason: str | None = None

    @field_validator("error")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in ERROR_CLASSES:
            raise ValueError(f"unknown error class {name!r}; this build knows {sorted(ERROR_CLASSES)}")
        return name

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        """``exc`` as data; an exception that is not a ``DitstreamError`` travels as the generation error
        it is to the client. A subclass outside the table travels as its nearest class in the table
        (the row its status comes from anyway)."""
        if not isinstance(exc, DitstreamError):
            exc = GenerationError(f"{type(exc).__name__}: {exc}")
        klass = next(k for k in type(exc).__mro__ if k.__name__ in ERROR_CLASSES and ERROR_CLASSES[k.__name__] is k)
        return cls(error=klass.__name__, code=exc.error_type, message=exc.message, **exc.details())

    def to_exception(self) -> DitstreamError:
        """The same class with the same message and details; its ``error_type`` is checked against
        ``code`` (a mismatch is two builds disagreeing about the table: loud, never a quiet remap)."""
        klass = ERROR_CLASSES[self.error]
        if klass.error_type != self.code:
            raise WireError(f"error {self.error} has code {klass.error_type!r} here, {self.code!r} on the wire")
        details = {k: v for k, v in (("field", self.field), ("retry_after", self.retry_after),
                                     ("reason", self.reason)) if v is not None}
        return klass(self.message, **details)


# ------------------------------------------------------------------------------------ jobs
class JobMessage(Msg):
    """One REST image, on the jobs stream. ``deadline`` is unix time: past it nobody waits."""

    kind: Literal["job"] = "job"
    job: str = Field(default_factory=lambda: uuid.uuid4().hex)
    reply_to: str
    #: The gateway waiting for it: once its ``gw:<id>`` key is gone, workers drop the job unrun.
    gateway: str = ""
    config: dict[str, Any]
    image: ImageMeta | None = None
    deadline: float
    attempt: int = 1
    created: float = Field(default_factory=time.time)
    #: How the REST response will code the result (None: raw pixels): the worker codes it so, the
    #: gateway relays the bytes — no decode and re-encode in the gateway, and a few hundred kB less
    #: than raw pixels on the reply stream.
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_quality: int = Field(95, ge=1, le=100)


class JobResult(Msg):
    """A finished (or failed) job, on the gateway's reply stream; ``img`` holds the image."""

    kind: Literal["result"] = "result"
    job: str
    worker: str
    image: ImageMeta | None = None
    error: ErrorInfo | None = None
    skipped: bool = False
    timings: dict[str, float] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------ sessions
class SessionControl(Msg):
    """Gateway → worker, on the worker's control stream: open, reconfigure or close a session."""

    kind: Literal["open", "reconfigure", "close", "wake"]
    session: str = ""
    request: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    reply_to: str = ""
    config: dict[str, Any] | None = None
    #: Bumped on every re-pin; a worker ignores frames and controls of an older epoch.
    epoch: int = 0


class SessionReply(Msg):
    """Worker → gateway: the answer to a ``SessionControl`` (applied config or an error)."""

    kind: Literal["session_reply"] = "session_reply"
    session: str
    request: str
    worker: str
    config: dict[str, Any] | None = None
    error: ErrorInfo | None = None


#: What a gateway's reply stream carries, told apart by the ``kind`` field.
Reply = Annotated[JobResult | SessionReply, Field(discriminator="kind")]
_REPLY: TypeAdapter[JobResult | SessionReply] = TypeAdapter(Reply)


def load_reply(raw: bytes | str) -> JobResult | SessionReply:
    """A reply-stream message as its type, read by its ``kind`` field (never by a substring of the JSON)."""
    msg = _REPLY.validate_json(raw)
    if msg.v != WIRE_VERSION:
        raise WireError(f"{type(msg).__name__} version {msg.v}; this build speaks {WIRE_VERSION}")
    return msg


class FrameHeader(Msg):
    """Gateway → worker, one input frame on ``in:<session>`` (``img`` holds the image or nothing)."""

    seq: int
    ts: float
    image: ImageMeta | None = None
    sent: float = Field(default_factory=time.time)
    #: The session epoch the gateway sent it under: a worker drops an older one, and closes its copy of
    #: the session on a newer one (the session moved elsewhere: stop reading and answering at once).
    epoch: int = 0
    #: JPEG quality the client wants its outputs at (0: the worker's ``jpeg_quality``).
    quality: int = 0


class OutputHeader(Msg):
    """Worker → gateway, one output frame on ``out:<session>``.

    A frame whose model call failed carries ``error`` and no image; the gateway hands it to the
    client as the in-band error for that ``seq``, and the session goes on. ``worker`` and ``epoch``
    say who answered under which pin: the gateway drops an output of any other (a worker the
    session moved away from), so no frame reaches a client twice or out of order.
    """

    seq: int
    ts: float
    image: ImageMeta | None = None
    skipped: bool = False
    timings: dict[str, float] = Field(default_factory=dict)
    worker: str = ""
    error: ErrorInfo | None = None
    epoch: int = 0
    #: The worker refused the input frame ``seq`` (e.g. its body does not decode: the gateway checks only
    #: headers) and ``error`` says why. Outside the output order: its seq neither advances nor is held
    #: against the order check (the frame before it may still be answered after it).
    refused: bool | None = None

    def dump(self) -> bytes:
        # ``error`` only when set: an image output is the same bytes an older gateway reads.
        return self.model_dump_json(exclude_none=True).encode()


class Heartbeat(Msg):
    """What a worker says about itself every beat, stored with a TTL under ``worker:<id>``."""

    worker: str
    host: str = ""
    pid: int = 0
    started: float = 0.0
    at: float = Field(default_factory=time.time)
    engine_alive: bool = True
    info: dict[str, Any] = Field(default_factory=dict)
    #: What the worker's engine accepts (size multiple and profile, pixel and prompt bounds, LoRA
    #: names): the gateway validates a config against it before anything is queued.
    limits: EngineLimits | None = None
    sessions: int = 0
    jobs_inflight: int = 0
    max_jobs: int = 1
    counters: dict[str, float] = Field(default_factory=dict)


class SessionRecord(Msg):
    """The gateway's record of a session (``sess:<id>``): enough for any worker to restart it."""

    session: str
    gateway: str
    worker: str
    epoch: int
    config: dict[str, Any]


# ------------------------------------------------------------------------------------ keys
#: Seconds a session's record and frame streams live past their last refresh or write (a dead
#: gateway's sessions, and their frames, go away).
SESSION_TTL_S = 30


class Keys:
    """Every Redis key ditstream uses, under ``<prefix>:v<WIRE_VERSION>`` (several deployments can
    share a Redis; so can two versions of one deployment during a rolling upgrade)."""

    def __init__(self, prefix: str = "ditstream", version: int = WIRE_VERSION) -> None:
        self.prefix = f"{prefix.rstrip(':')}:v{version}"

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def jobs(self) -> str:
        return self._k("jobs")

    @property
    def dead_letter(self) -> str:
        return self._k("jobs", "dead")

    group = "workers"

    @property
    def workers(self) -> str:
        """Set of worker ids ever seen (liveness is the TTL'd ``worker:<id>`` key)."""
        return self._k("workers")

    def worker(self, wid: str) -> str:
        return self._k("worker", wid)

    def worker_control(self, wid: str) -> str:
        return self._k("wctl", wid)

    def done(self, job: str) -> str:
        """Set NX by whoever answers ``job`` first: the guard against answering twice."""
        return self._k("done", job)

    def gateway(self, gid: str) -> str:
        """A gateway's liveness key (TTL ``gateway_ttl_s``, refreshed every supervisor pass)."""
        return self._k("gw", gid)

    def replies(self, gateway: str) -> str:
        return self._k("replies", gateway)

    def session(self, sid: str) -> str:
        return self._k("sess", sid)

    def frames_in(self, sid: str) -> str:
        return self._k("in", sid)

    def frames_out(self, sid: str) -> str:
        return self._k("out", sid)
