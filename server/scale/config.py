"""What the gateway and the workers share: scale-out settings, the Redis client and loop helpers.

Every long-lived loop on either side survives Redis going away: a ``ConnectionError`` (or a
``NOGROUP`` after a restart wiped the consumer group) is logged once, waited out with capped
exponential backoff and the loop resumes — nothing is cached that a restarted Redis would
invalidate, except stream positions, which stay valid because stream ids are time-based. Behind
Sentinel (``redis_conn.py``) a failover is one more such outage: the client finds the new primary.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ditstream.server.scale.messages import Codec, Keys
from ditstream.server.scale.redis_conn import RedisTarget

if TYPE_CHECKING:
    import redis
    from ditstream.server.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleConfig:
    """Knobs of the Redis transport (defaults suit one LAN; the tests shrink the timeouts)."""

    #: A plain Redis URL or ``redis+sentinel://...`` (``redis_conn.py``), parsed once into ``redis``.
    redis_url: str
    prefix: str = "ditstream"
    #: A worker beats this often and its key lives ``worker_ttl_s``: a dead worker is noticed
    #: (sessions re-pinned) within ``worker_ttl_s`` plus one supervisor pass.
    heartbeat_s: float = 1.0
    worker_ttl_s: float = 5.0
    #: A pending job nobody touched for this long belongs to a dead worker and is XAUTOCLAIMed.
    #: Live workers re-claim their in-flight jobs every beat, so a slow job is never stolen.
    claim_idle_s: float = 5.0
    #: Deliveries (crashes included) after which a job goes to the dead-letter stream.
    max_attempts: int = 3
    #: Jobs one worker holds at once (the rest stay in the stream for other workers).
    max_jobs: int = 4
    #: Streams one worker is sized for (advertised in its heartbeat; the autoscaling signal's capacity,
    #: not a limit) and how long a queued job may wait before the queue asks for workers.
    stream_capacity: int = 4
    autoscale_job_wait_s: float = 5.0
    #: Encoding of stream frames on the wire. A job's input image travels raw (lossless); its result is
    #: coded as its REST response will be (``JobMessage.output_format``), raw when none is asked.
    frame_codec: Codec = "jpeg"
    jpeg_quality: int = 90
    #: Input frames kept per session (latest wins) and outputs kept per session (oldest dropped).
    frames_in_len: int = 2
    frames_out_len: int = 4
    #: A gateway deletes each reply once read, so its reply stream stays about empty (an output
    #: stream is left to its ``frames_out_len`` cap: deleting each output cost a round trip per frame);
    #: ``replies_len`` only caps a gateway that stopped reading, and a reply stream nobody writes to
    #: for ``replies_ttl_s`` expires (a dead gateway's replies go away). Session keys live
    #: ``SESSION_TTL_S`` past their last write. Dead-letter entries kept; how long "answered" marks live.
    replies_len: int = 256
    replies_ttl_s: int = 60
    dead_letter_len: int = 1000
    done_ttl_s: int = 3600
    #: Gateway: how often it checks workers, sessions and deadlines.
    supervise_s: float = 0.25
    #: A gateway's liveness key lives this long unrefreshed: then workers drop its jobs and sessions.
    gateway_ttl_s: float = 10.0
    #: Gateway: sessions spread again when workers return or join — at most one of this gateway's
    #: sessions moves per interval, from the live worker with the most sessions to the one with the
    #: fewest, while they differ by two or more (counts from the heartbeats). 0 = never move a
    #: session off a live worker.
    rebalance_s: float = 2.0
    #: ``redis_url`` parsed (a bad URL fails here, at construction, with its reason).
    redis: RedisTarget = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "redis", RedisTarget.parse(self.redis_url))

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ScaleConfig:
        url = overrides.pop("redis_url", None) or settings.redis_url
        if not url:
            raise ValueError("no Redis URL: pass --redis or set DITSTREAM_REDIS_URL")
        values: dict[str, Any] = {
            "prefix": settings.redis_prefix, "heartbeat_s": settings.worker_heartbeat_s,
            "worker_ttl_s": settings.worker_ttl_s, "claim_idle_s": settings.job_claim_idle_s,
            "max_attempts": settings.job_max_attempts, "max_jobs": settings.worker_max_jobs,
            "frame_codec": settings.frame_codec, "frames_out_len": settings.output_queue_size,
            "gateway_ttl_s": settings.gateway_ttl_s, "rebalance_s": settings.session_rebalance_s,
            "stream_capacity": settings.worker_stream_capacity, "autoscale_job_wait_s": settings.autoscale_job_wait_s,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(redis_url=url, **values)


def ensure_group(r: redis.Redis, keys: Keys) -> None:
    """Create the jobs stream and its consumer group if missing (after a Redis restart, too).

    The group starts at id 0 so jobs queued before any worker existed are still delivered.
    """
    import redis as _redis

    try:
        r.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    except _redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Backoff:
    """Capped exponential wait for loops that lost Redis; logs the outage once, not per retry."""

    def __init__(self, what: str, stop: threading.Event, base: float = 0.05, cap: float = 1.0) -> None:
        self.what = what
        self.stop = stop
        self.base = base
        self.cap = cap
        self.delay = 0.0
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            logger.warning("%s: lost Redis (%s); retrying", self.what, exc)
        self.delay = min(self.cap, max(self.base, self.delay * 2))
        self.stop.wait(self.delay)

    def ok(self) -> None:
        if self.failures:
            logger.info("%s: Redis is back after %d failed attempt(s)", self.what, self.failures)
        self.failures = 0
        self.delay = 0.0


def conn_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "Redis is unreachable now": every loop backs off on these and retries."""
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


def is_nogroup(exc: BaseException) -> bool:
    return "NOGROUP" in str(exc)


def fields_get(fields: dict[Any, Any], name: str) -> bytes | None:
    """A stream entry field, whatever the client's key type (bytes or str)."""
    v = fields.get(name.encode(), fields.get(name))
    return v if v is None or isinstance(v, bytes) else str(v).encode()


def sid_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
