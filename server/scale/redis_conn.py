"""Where the gateway and the workers reach Redis: one URL, parsed once, and the one client factory.

Two forms of URL:

- a plain Redis URL (``redis://``, ``rediss://``, ``unix://``): one server, handed to redis-py's
  ``Redis.from_url`` as it is;
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER[/DB]``: a Sentinel-monitored
  primary. The client asks the sentinels which server is the primary of ``MASTER`` and follows it:
  redis-py's ``SentinelConnectionPool`` asks them again on every new connection, and a connection
  to a primary that was demoted (``READONLY``) or died fails with ``ConnectionError``, which every
  loop already backs off on (``config.Backoff``). The credentials are the data servers'; the
  sentinels are reached without a password.

``RedisTarget.parse`` runs once, at the edge (``Settings`` and ``ScaleConfig``); ``connect`` takes
the parsed target, so a bad URL is refused at start-up with its reason, never at the first command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    import redis

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_FORM = "redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER[/DB]"


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: a plain server (``sentinels`` empty: ``url`` goes to redis-py as it is) or
    the primary ``master`` that ``sentinels`` monitor."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """Check ``url`` and take it apart; ``ValueError`` names what is wrong and the accepted forms."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in (*PLAIN_SCHEMES, SENTINEL_SCHEME):
            raise ValueError(f"unsupported Redis URL {redact(url)!r}: expected redis://, rediss://, unix:// "
                             f"or {SENTINEL_FORM}")
        if scheme != SENTINEL_SCHEME:
            return cls(url=url)
        creds, _, where = rest.rpartition("@")
        hosts, _, path = where.partition("/")
        if "?" in path:
            raise ValueError(f"{redact(url)!r}: a Sentinel URL takes no query options ({SENTINEL_FORM})")
        parts = [p for p in path.split("/") if p]
        if not hosts or not 1 <= len(parts) <= 2:
            raise ValueError(f"{redact(url)!r} is not {SENTINEL_FORM}")
        if len(parts) == 2 and not parts[1].isdigit():
            raise ValueError(f"{redact(url)!r}: the database must be a number, got {parts[1]!r}")
        username, password = None, None
        if creds:
            user, colon, pw = creds.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if colon else None
        return cls(url=url, sentinels=tuple(_host_port(h, url) for h in hosts.split(",")), master=unquote(parts[0]),
                   db=int(parts[1]) if len(parts) == 2 else 0, username=username, password=password)


def _host_port(item: str, url: str) -> tuple[str, int]:
    host, colon, port = item.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{redact(url)!r}: each sentinel is host:port, got {item!r} ({SENTINEL_FORM})")
    return host.strip("[]"), int(port)


def connect(target: RedisTarget) -> redis.Redis:
    """A thread-safe pooled client that retries a dropped connection with capped backoff.

    ``socket_timeout`` is above every BLOCK we issue (≤ 1 s), so a blocking read never times out
    on its own; a dead server shows up as ``ConnectionError`` within ``socket_connect_timeout``.
    Behind Sentinel the same options apply to the primary; the sentinels themselves get short
    timeouts, so asking them where the primary went costs at most a second per dead sentinel.
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    options = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, "health_check_interval": 10,
               "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3),
               "retry_on_error": [redis.ConnectionError, redis.TimeoutError], "client_name": "ditstream"}
    if not target.is_sentinel:
        return redis.Redis.from_url(target.url, **options)
    from redis.sentinel import Sentinel

    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs={"socket_timeout": 1.0,
                                                                 "socket_connect_timeout": 1.0})
    return sentinel.master_for(target.master, db=target.db, username=target.username, password=target.password,
                               **options)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
