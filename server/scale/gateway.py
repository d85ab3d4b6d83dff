"""The gateway: an ``EngineClient`` whose engines are workers behind Redis.

``create_app(settings, runner=RedisGatewayRunner(...))`` serves REST and WebSocket unchanged: the
app only ever calls ``add_stream``/``submit_job``/``validate`` and reads ``alive``/``info``. Calls
that come from the event loop (``submit``, ``submit_job``, ``reconfigure``, ``close``) never touch
the network: they leave work in an outbox that the publisher thread sends.

``RedisGatewayRunner`` owns and wires the parts, each with its own state:

- ``GatewayJobs`` (``gateway_jobs.py``): pending REST jobs and their futures;
- ``GatewaySessions`` (``gateway_sessions.py``): live sessions, pinning, controls, close;
- ``Publisher`` (``gateway_publisher.py``, a thread): sends the ``Outbox`` and each session's newest
  frame (``MAXLEN`` 2: latest wins at every hop);
- ``Reader`` (``gateway_reader.py``, a thread): one ``XREAD`` over the reply stream and every
  session's output stream; resolves job and control futures, queues outputs on the handles;
- ``Supervisor`` (``gateway_supervisor.py``, a thread): keeps the ``Fleet`` of live workers and
  ``alive`` (Redis reachable and ≥ 1 live worker), re-pins sessions whose worker is gone or whose
  record vanished, re-sends the pending jobs a restarted or failed-over Redis lost, fails overdue jobs;
- ``Counters``: every event count, bumped from any of these threads under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
from ditstream.engine.config import DEFAULT_SIZE_MULTIPLE, EngineConfig, StreamConfig
from ditstream.engine.errors import CancelledError, EngineDeadError
from ditstream.engine.limits import EngineLimits, ensure_valid
from ditstream.engine.types import MetricsSink
from ditstream.server.scale.autoscale import AutoscaleCollector
from ditstream.server.scale.config import ScaleConfig, conn_errors
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.gateway_jobs import GatewayJobs
from ditstream.server.scale.gateway_publisher import Outbox, Publisher
from ditstream.server.scale.gateway_reader import Reader
from ditstream.server.scale.gateway_sessions import GatewaySessions
from ditstream.server.scale.gateway_stream import GatewayStreamHandle, WorkerCollector
from ditstream.server.scale.gateway_supervisor import Fleet, Supervisor
from ditstream.server.scale.messages import Heartbeat
from ditstream.server.scale.redis_conn import connect, redact

if TYPE_CHECKING:
    from ditstream.server.settings import Settings

__all__ = ["GatewayStreamHandle", "RedisGatewayRunner"]

logger = logging.getLogger(__name__)

#: Every event a gateway counts (``stats()``, ``ditstream_gateway_events`` on /metrics).
GATEWAY_COUNTERS = (
    "jobs_sent", "jobs_answered", "jobs_failed", "jobs_expired", "jobs_resent", "duplicate_answers",
    "sessions_pinned", "sessions_repinned", "sessions_rebalanced", "frames_sent", "frames_received", "frames_resent",
    "outputs_stale")


class RedisGatewayRunner:
    """The ``EngineClient`` of gateway mode (``server/engine_client.py``; see the module docstring)."""

    def __init__(self, cfg: ScaleConfig, engine: EngineConfig | None = None, *, job_timeout_s: float = 120.0,
                 gateway_id: str | None = None, open_timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.keys = cfg.keys
        self.engine_config = engine or EngineConfig()
        self.job_timeout_s = job_timeout_s
        self.open_timeout_s = open_timeout_s
        self.id = gateway_id or f"gw-{uuid.uuid4().hex[:10]}"
        self.replies = self.keys.replies(self.id)
        self.r = connect(cfg.redis)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self.counters = Counters(GATEWAY_COUNTERS)
        self.fleet = Fleet()
        self.outbox = Outbox()
        max_pixels = self.engine_config.max_pixels
        self.jobs = GatewayJobs(self.id, self.replies, self.outbox, self.counters, job_timeout_s=job_timeout_s,
                                max_pixels=max_pixels)
        self.sessions = GatewaySessions(self.r, cfg, self.id, self.replies, self.engine_config, self.outbox,
                                        self.fleet, self.counters, open_timeout_s=open_timeout_s,
                                        validate=self.validate, running=lambda: self.running)
        self.publisher = Publisher(self.r, cfg, self.id, self.replies, self.outbox, self.jobs, self.sessions,
                                   self.counters, self._stop)
        self.reader = Reader(self.r, self.keys, self.id, self.replies, self.jobs, self.sessions, self.counters,
                             self._stop, max_pixels=max_pixels)
        self.supervisor = Supervisor(self.r, cfg, self.id, self.fleet, self.jobs, self.sessions, self.counters,
                                     self._stop, running=lambda: self.running)

    # ------------------------------------------------------------------------------ lifecycle
    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RedisGatewayRunner:
        return cls(ScaleConfig.from_settings(settings, **overrides), settings.engine_config(),
                   job_timeout_s=settings.job_timeout_s)

    def start(self) -> RedisGatewayRunner:
        if self._started:
            return self
        self._started = True
        with contextlib.suppress(*conn_errors()):
            self.supervisor.supervise_once()  # know the workers before the first request, if Redis is up
        loops: tuple[tuple[Callable[[], None], str], ...] = (
            (self.publisher.loop, "publisher"), (self.reader.loop, "reader"), (self.supervisor.loop, "supervisor"))
        for target, name in loops:
            t = threading.Thread(target=target, name=f"ditstream-gateway-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("gateway %s on %s: %d live worker(s)", self.id, redact(self.cfg.redis_url), len(self.workers))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.outbox.wake()
        self.sessions.close_all()
        self.publisher.flush()
        for t in self._threads:
            t.join(timeout)
        self.jobs.fail_all(CancelledError("the gateway stopped"))
        with contextlib.suppress(Exception):
            self.r.delete(self.replies, self.keys.gateway(self.id))  # workers drop what is left for us
            self.r.close()
        self._started = False

    @property
    def running(self) -> bool:
        return self._started and not self._stop.is_set()

    @property
    def workers(self) -> dict[str, Heartbeat]:
        """The live workers' heartbeats, as the supervisor last read them."""
        return self.fleet.workers

    @property
    def redis_ok(self) -> bool:
        return self.fleet.redis_ok

    @property
    def alive(self) -> bool:
        """Redis answers and at least one worker's heartbeat is fresh (read from the supervisor's snapshot)."""
        return self.running and self.fleet.redis_ok and bool(self.fleet.workers)

    def check_alive(self) -> None:
        if not self.fleet.redis_ok:
            raise EngineDeadError("Redis is unreachable")
        if not self.fleet.workers:
            raise EngineDeadError("no live worker")

    @property
    def workers_up(self) -> int:
        return len(self.workers)

    @property
    def info(self) -> dict[str, Any]:
        hb = next(iter(self.workers.values()), None)
        info = dict(hb.info) if hb else {"model": None, "size_multiple": None, "defaults": {}}
        info.update(mode="gateway", gateway=self.id, workers=len(self.workers))
        return info

    @property
    def limits(self) -> EngineLimits:
        """What every live worker accepts (their ``Heartbeat.limits`` narrowed together: any of them may
        take a job or a re-pinned stream), bounded by this gateway's own request limits. The server's
        edge checks a config against these once, so an out-of-profile size or an unknown LoRA is
        refused here, before anything is queued, with the error an in-process engine raises."""
        limits: EngineLimits | None = None
        for hb in self.workers.values():
            theirs = hb.limits if hb.limits is not None else EngineLimits(
                size_multiple=int(hb.info.get("size_multiple") or DEFAULT_SIZE_MULTIPLE),
                loras=tuple(sorted(hb.info.get("loras") or {})))
            limits = theirs if limits is None else limits.narrowed(theirs)
        return (limits or EngineLimits()).tightened(max_pixels=self.engine_config.max_pixels,
                                                    max_prompt_chars=self.engine_config.max_prompt_chars)

    @property
    def ready(self) -> bool:
        """Workers join the fleet only once warm, so a live worker is a ready one."""
        return self.alive

    @property
    def warming(self) -> list[str]:
        return []

    def prefer_warmup_size(self, width: int, height: int) -> None:
        """Nothing to warm here: each worker warms its own engine before it joins."""

    def health(self) -> dict[str, Any]:
        """Extra fields for ``/ready``."""
        return {"mode": "gateway", "redis": self.fleet.redis_ok, "workers": len(self.workers)}

    def stats(self) -> dict[str, Any]:
        return {"streams": self.sessions.count(), "jobs": self.jobs.count(), "workers": len(self.workers),
                "alive": self.alive, **self.counters.snapshot()}

    # ------------------------------------------------------------------------------ requests
    def validate(self, cfg: StreamConfig) -> StreamConfig:
        """``cfg`` checked against ``limits`` (taken on trust when the server's edge already did). The
        worker that runs it checks again at its own edge: a config read off Redis passed none of its own."""
        return ensure_valid(cfg, self.limits)

    def add_stream(self, cfg: StreamConfig, notify: Callable[[], None] | None = None,
                   timeout: float | None = 60.0) -> GatewayStreamHandle:
        """Pin a new session to the least busy live worker (blocking: call it off the event loop)."""
        self.check_alive()
        return self.sessions.add_stream(self.validate(cfg), notify, timeout)

    def submit_job(self, cfg: StreamConfig, image: np.ndarray | None = None,
                   encode: tuple[str, int] | None = None) -> Future:
        """Queue one image on the jobs stream; the future yields a ``StreamOutput`` (never blocks),
        with ``encoded`` set when ``encode`` asked the worker to code the result."""
        self.check_alive()
        return self.jobs.submit(self.validate(cfg), image, encode)

    def bind_metrics(self, metrics: MetricsSink) -> None:
        """Export per-worker figures (from heartbeats), gateway counters and the fleet's autoscaling
        signal on the app's /metrics."""
        metrics.registry.register(WorkerCollector(self))
        metrics.registry.register(AutoscaleCollector(self))
