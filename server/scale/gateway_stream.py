"""What the gateway hands out: a session's handle (an ``EngineStream``), and the Prometheus collector
of the workers' heartbeats."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import (
    DitstreamError,
    EngineDeadError,
    ValidationError,
)
from ditstream.engine.limits import check_input
from ditstream.engine.queues import LatestSlot, OutputQueue
from ditstream.engine.types import StreamOutput, StreamStats
from ditstream.server.scale.messages import (
    ImageMeta,
)

__all__ = ["GatewayStreamHandle", "WorkerCollector"]

if TYPE_CHECKING:
    from ditstream.server.scale.gateway import RedisGatewayRunner
    from ditstream.server.scale.gateway_sessions import GatewaySessions


class GatewayStreamHandle:
    """A session as the app sees it; its engine lives on whichever worker it is pinned to."""

    #: ``EngineStream``: frames are relayed as the client coded them; the worker decodes and encodes.
    takes_encoded = True

    def __init__(self, sessions: GatewaySessions, sid: str, cfg: StreamConfig,
                 notify: Callable[[], None] | None) -> None:
        self._sessions = sessions
        self.id = sid
        self._config = cfg
        self.outputs: OutputQueue[StreamOutput] = OutputQueue(sessions.engine_config.output_queue_size, notify)
        self.stats = StreamStats()
        #: (image, seq, ts, (meta, bytes) when the client's coded bytes are relayed as they are)
        self.slot: LatestSlot[tuple[np.ndarray | None, int, float, tuple[ImageMeta, bytes] | None]] = LatestSlot()
        #: Set by ``code_outputs``: outputs stay JPEG (``StreamOutput.encoded``), never decoded here.
        self.relay_encoded = False
        #: JPEG quality the client wants (0: the worker's); sent with every frame.
        self.output_quality = 0
        #: The worker it is pinned to, and the pin's epoch (bumped on every pin: stale outputs are dropped).
        self.worker = ""
        self.epoch = 0
        #: The reader's position in the session's output stream.
        self.last_out = "0-0"
        #: The ``seq`` of the last output handed to the client. Outputs of another worker or epoch, and
        #: repeats of an answered ``seq`` after a re-pin, are dropped (exactly once, in order).
        self.last_seq_out = -1
        #: The newest frames sent as (seq, ts, meta, bytes): those unanswered are sent again after a re-pin.
        self.sent: deque[tuple[int, float, Any, bytes]] = deque(maxlen=2)
        self.closed = False
        #: Set when the session lost its worker and no live worker would re-open it: every later
        #: frame is answered with this error (the client is told and closed, 1013), not with silence.
        self.failed: DitstreamError | None = None
        #: When the supervisor last refreshed the session record's TTL (monotonic seconds).
        self.refreshed = 0.0
        #: True while it is being pinned (``add_stream``, a re-pin, a rebalancing move): the supervisor
        #: leaves it alone (it would otherwise see a worker set but no record yet, "re-pin" it
        #: concurrently and split the session).
        self.pinning = False

    @property
    def config(self) -> StreamConfig:
        return self._config

    def applied(self, cfg: StreamConfig) -> None:
        """A worker opened the session with ``cfg`` (as it applied it)."""
        self._config = cfg

    def submit(self, image: np.ndarray | None, seq: int = 0, ts: float = 0.0) -> bool:
        """Offer a frame; never blocks (the publisher thread sends it). True if one was replaced.

        Not refused while Redis or the worker is briefly gone: the slot keeps the newest frame and
        the session resumes when the supervisor has re-pinned it — a stream outlives an outage.
        """
        self._check_open()
        check_input(self._config, image)
        return self._offer((image, seq, ts, None))

    def submit_encoded(self, data: bytes, seq: int, ts: float, fmt: str, width: int, height: int) -> bool:
        """Offer a frame as the client coded it (its header already checked): relayed to the worker
        byte for byte, decoded there once. Same contract as ``submit``."""
        self._check_open()
        meta = ImageMeta(codec=fmt, width=width, height=height)  # type: ignore[arg-type]
        return self._offer((None, seq, ts, (meta, data)))

    def code_outputs(self, quality: int) -> None:
        """``EngineStream``: outputs stay the worker's JPEG, coded at ``quality``."""
        self.relay_encoded, self.output_quality = True, quality

    def _check_open(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.closed or not self._sessions.running():
            raise EngineDeadError("the gateway is not running")

    def _offer(self, item: tuple[np.ndarray | None, int, float, tuple[ImageMeta, bytes] | None]) -> bool:
        replaced = self.slot.put(item)
        if replaced:
            self.stats.dropped_inputs += 1
        self._sessions.outbox.wake()
        return replaced

    def reconfigure(self, **changes: Any) -> Future:
        """Validate now; the future resolves to the config the worker applied."""
        try:
            cfg = self._sessions.validate(self._config.replace(**changes))
        except TypeError as exc:
            raise ValidationError(f"unknown config key: {exc}") from exc
        self._config = cfg  # a re-pin opens the session with the newest config
        return self._sessions.control(self, "reconfigure", cfg)

    def close(self) -> None:
        self._sessions.close_session(self)


class WorkerCollector:
    """Prometheus collector reading the supervisor's heartbeat snapshot (no Redis I/O on scrape)."""

    def __init__(self, gateway: RedisGatewayRunner) -> None:
        self.gw = gateway

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("ditstream_worker_up", "1 per worker with a fresh heartbeat.", labels=["worker"])
        sessions = GaugeMetricFamily("ditstream_worker_sessions", "Streams pinned to each worker.", labels=["worker"])
        inflight = GaugeMetricFamily("ditstream_worker_jobs_inflight", "REST jobs each worker holds.",
                                     labels=["worker"])
        jobs = CounterMetricFamily("ditstream_worker_jobs", "REST jobs per worker by outcome.",
                                   labels=["worker", "outcome"])
        frames = CounterMetricFamily("ditstream_worker_frames", "Stream frames per worker.",
                                     labels=["worker", "direction"])
        infer = CounterMetricFamily("ditstream_worker_inference_seconds", "Model time of REST jobs per worker.",
                                    labels=["worker"])
        for wid, hb in sorted(self.gw.workers.items()):
            up.add_metric([wid], 1)
            sessions.add_metric([wid], hb.sessions)
            inflight.add_metric([wid], hb.jobs_inflight)
            c = hb.counters
            for outcome in ("done", "failed", "expired", "duplicate", "claimed", "dead_lettered", "retried"):
                jobs.add_metric([wid, outcome], c.get(f"jobs_{outcome}", 0))
            frames.add_metric([wid, "in"], c.get("frames_in", 0))
            frames.add_metric([wid, "out"], c.get("frames_out", 0))
            infer.add_metric([wid], c.get("inference_s", 0.0))
        gw = CounterMetricFamily("ditstream_gateway_events", "Gateway events (jobs re-sent, sessions re-pinned, ...).",
                                 labels=["event"])
        for k, v in sorted(self.gw.counters.items()):
            gw.add_metric([k], v)
        yield from (up, sessions, inflight, jobs, frames, infer, gw)
