"""The gateway: an ``EngineClient`` whose engines are workers behind Redis.

This module holds its state, lifecycle and jobs; ``gateway_sessions.py`` its live sessions,
``gateway_threads.py`` its three threads, ``gateway_stream.py`` the handles it gives out.

``create_app(settings, runner=RedisGatewayRunner(...))`` serves REST and WebSocket unchanged: the
app only ever calls ``add_stream``/``submit_job``/``validate`` and reads ``alive``/``info``. Calls
that come from the event loop (``submit``, ``submit_job``, ``reconfigure``, ``close``) never touch
the network: they leave work in an outbox that the **publisher** thread sends. Three threads:

- **publisher**: encodes each session's newest frame and ``XADD``\\ s it to the session's input
  stream (``MAXLEN`` 2: latest wins at every hop); sends jobs, controls and cancellations.
- **reader**: one ``XREAD`` over this gateway's reply stream and every session's output stream;
  resolves job futures and control futures, decodes outputs into each handle's ``OutputQueue``.
- **supervisor**: reads worker heartbeats (TTL'd keys), keeps ``alive`` (Redis reachable and
  ≥ 1 live worker), re-pins sessions whose worker is gone or whose record vanished (Redis
  restarted), re-sends pending jobs after a Redis restart, and fails jobs past their deadline.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
from ditstream.engine.config import DEFAULT_SIZE_MULTIPLE, EngineConfig, StreamConfig
from ditstream.engine.errors import (
    CancelledError,
    EngineDeadError,
    GenerationError,
    ValidationError,
)
from ditstream.engine.imagefile import check_header
from ditstream.engine.limits import EngineLimits
from ditstream.engine.types import EncodedImage, MetricsSink, StreamOutput
from ditstream.server.scale.config import (
    ScaleConfig,
    connect,
    redact,
)
from ditstream.server.scale.gateway_sessions import GatewaySessions
from ditstream.server.scale.gateway_stream import (
    RECENT_RESULTS,
    GatewayCore,
    GatewayStreamHandle,
    PendingJob,
    WorkerCollector,
)
from ditstream.server.scale.gateway_threads import GatewayThreads
from ditstream.server.scale.messages import (
    Heartbeat,
    JobMessage,
    JobResult,
    config_to_wire,
    decode_image,
    encode_image,
)

if TYPE_CHECKING:
    from ditstream.server.settings import Settings

logger = logging.getLogger(__name__)









class RedisGatewayRunner(GatewayThreads, GatewaySessions):
    """The ``EngineClient`` of gateway mode (``server/engine_client.py``; see the module docstring)."""

    def __init__(self, cfg: ScaleConfig, engine: EngineConfig | None = None, *, job_timeout_s: float = 120.0,
                 gateway_id: str | None = None, open_timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.keys = cfg.keys
        self.engine_config = engine or EngineConfig()
        self.core = GatewayCore(self.engine_config)
        self.job_timeout_s = job_timeout_s
        self.open_timeout_s = open_timeout_s
        self.id = gateway_id or f"gw-{uuid.uuid4().hex[:10]}"
        self.replies = self.keys.replies(self.id)
        self.r = connect(cfg.redis_url)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self.redis_ok = False
        self.workers: dict[str, Heartbeat] = {}
        self._run_id: str | None = None
        self._restart_grace_until = 0.0
        self._rebalance_after = 0.0
        self._lock = threading.Lock()
        self._sessions: dict[str, GatewayStreamHandle] = {}
        self._jobs: dict[str, PendingJob] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()  # job -> worker that answered
        self._controls: dict[str, tuple[Future, str]] = {}  # request -> (future, session)
        self._outbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._publish_wake = threading.Event()
        self._repin_now = threading.Event()
        self.counters: dict[str, int] = {k: 0 for k in (
            "jobs_sent", "jobs_answered", "jobs_failed", "jobs_expired", "jobs_resent", "duplicate_answers",
            "sessions_pinned", "sessions_repinned", "sessions_rebalanced", "frames_sent", "frames_received", "frames_resent",
            "outputs_stale")}

    # ------------------------------------------------------------------------------ lifecycle
    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RedisGatewayRunner:
        return cls(ScaleConfig.from_settings(settings, **overrides), settings.engine_config(),
                   job_timeout_s=settings.job_timeout_s)

    def start(self) -> RedisGatewayRunner:
        if self._started:
            return self
        self._started = True
        with contextlib.suppress(*self._conn_errors()):
            self._supervise_once()  # know the workers before the first request, if Redis is up
        for target, name in ((self._publisher_loop, "publisher"), (self._reader_loop, "reader"),
                             (self._supervisor_loop, "supervisor")):
            t = threading.Thread(target=target, name=f"ditstream-gateway-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("gateway %s on %s: %d live worker(s)", self.id, redact(self.cfg.redis_url), len(self.workers))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._publish_wake.set()
        for handle in list(self._sessions.values()):
            self.close_session(handle)
        self._flush_outbox()
        for t in self._threads:
            t.join(timeout)
        err = CancelledError("the gateway stopped")
        with self._lock:
            for job in self._jobs.values():
                if not job.future.done():
                    job.future.set_exception(err)
            self._jobs.clear()
        with contextlib.suppress(Exception):
            self.r.delete(self.replies, self.keys.gateway(self.id))  # workers drop what is left for us
            self.r.close()
        self._started = False

    @property
    def running(self) -> bool:
        return self._started and not self._stop.is_set()

    @property
    def alive(self) -> bool:
        """Redis answers and at least one worker's heartbeat is fresh (read from the supervisor's snapshot)."""
        return self._started and not self._stop.is_set() and self.redis_ok and bool(self.workers)

    def check_alive(self) -> None:
        if not self.redis_ok:
            raise EngineDeadError("Redis is unreachable")
        if not self.workers:
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
        """What the workers accept, as they advertise it (``Heartbeat.limits``; the fleet runs one model),
        bounded by this gateway's own request limits: the server's edge refuses an out-of-profile size
        or an unknown LoRA here, before anything is queued. A worker that does not advertise yet is
        described by its size multiple and LoRA names (no profile)."""
        hb = next(iter(self.workers.values()), None)
        if hb is not None and hb.limits is not None:
            base = hb.limits
        else:
            info = hb.info if hb is not None else {}
            base = EngineLimits(size_multiple=int(info.get("size_multiple") or DEFAULT_SIZE_MULTIPLE),
                                loras=tuple(sorted(info.get("loras") or {})))
        return base.tightened(max_pixels=self.engine_config.max_pixels,
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
        return {"mode": "gateway", "redis": self.redis_ok, "workers": len(self.workers)}

    def stats(self) -> dict[str, Any]:
        return {"streams": len(self._sessions), "jobs": len(self._jobs), "workers": len(self.workers),
                "alive": self.alive, **self.counters}

    def wake_publisher(self) -> None:
        self._publish_wake.set()

    def validate(self, cfg: StreamConfig) -> StreamConfig:
        """The same checks as an engine, with the workers' size multiple; the worker checks again."""
        mult = int(self.info.get("size_multiple") or DEFAULT_SIZE_MULTIPLE)
        return cfg.validate(max_prompt_chars=self.engine_config.max_prompt_chars,
                            max_pixels=self.engine_config.max_pixels, size_multiple=mult)
    def submit_job(self, cfg: StreamConfig, image: np.ndarray | None = None,
                   encode: tuple[str, int] | None = None) -> Future:
        """Queue one image on the jobs stream; the future yields a ``StreamOutput`` (never blocks),
        with ``encoded`` set when ``encode`` asked the worker to code the result."""
        self.check_alive()
        cfg = self.validate(cfg)
        if image is None and cfg.mode == "img2img":
            raise ValidationError("img2img needs an input image", field="image")
        meta, data = encode_image(image, "raw") if image is not None else (None, b"")
        coding = {"output_format": encode[0], "output_quality": encode[1]} if encode is not None else {}
        msg = JobMessage(reply_to=self.replies, gateway=self.id, config=config_to_wire(cfg), image=meta,
                         deadline=time.time() + self.job_timeout_s, **coding)
        future: Future = Future()
        with self._lock:
            self._jobs[msg.job] = PendingJob(msg, data, future)
        future.add_done_callback(lambda f: self._job_done(msg.job, f))
        self._outbox.put(("job", msg.job))
        self._publish_wake.set()
        return future

    def _job_done(self, job: str, future: Future) -> None:
        with self._lock:
            self._jobs.pop(job, None)
        if future.cancelled():  # the client left: mark it answered so no worker starts it
            self._outbox.put(("cancel", job))
            self._publish_wake.set()

    def _on_result(self, res: JobResult, img: bytes) -> None:
        with self._lock:
            pending = self._jobs.pop(res.job, None)
            if pending is None:
                if res.job in self._recent:
                    self.counters["duplicate_answers"] += 1
                    logger.error("job %s answered twice (%s, then %s)", res.job, self._recent[res.job], res.worker)
                return
            self._recent[res.job] = res.worker
            while len(self._recent) > RECENT_RESULTS:
                self._recent.popitem(last=False)
        fut = pending.future
        if fut.done():
            return
        if res.error is not None:
            self.counters["jobs_failed"] += 1
            fut.set_exception(res.error.to_exception())
            return
        image, encoded = None, None
        try:
            if res.image is not None and res.image.codec != "raw":  # coded by the worker: relayed as it is
                fmt, w, h = check_header(img, max_pixels=self.engine_config.max_pixels,
                                         size=(res.image.width, res.image.height))
                encoded = EncodedImage(img, w, h, res.image.quality, format=fmt)
            elif res.image is not None:
                image = decode_image(res.image, img, max_pixels=self.engine_config.max_pixels)
        except Exception as exc:
            fut.set_exception(GenerationError(f"unreadable result from {res.worker}: {exc}"))
            return
        self.counters["jobs_answered"] += 1
        fut.set_result(StreamOutput(stream_id=res.job, seq=0, ts=0.0, image=image, skipped=res.skipped,
                                    timings=dict(res.timings), encoded=encoded))


    def bind_metrics(self, metrics: MetricsSink) -> None:
        """Export per-worker figures (from heartbeats) and gateway counters on the app's /metrics."""
        metrics.registry.register(WorkerCollector(self))


