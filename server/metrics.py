"""The server's own Prometheus metrics, defined in one place (names from DESIGN.md).

Each app gets its own ``CollectorRegistry`` so several apps (tests, benches) can live in one
process. One more source adds to that registry: in gateway mode the gateway's ``bind_metrics``
registers a collector of per-worker figures read from the workers' heartbeats
(``ditstream_worker_*``, ``ditstream_gateway_events``; ``server/scale``) and one of the fleet's
autoscaling signal (``FLEET_GAUGES`` below; ``server/scale/autoscale.py``). No label ever carries a
session id: cardinality stays fixed. Observations come from the event loop (per output, per
request), from the engine thread (batch sizes, model failures) and from codec threads (frames dropped
at the hand-off); ``prometheus_client`` is thread-safe and each call is a few hundred nanoseconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                    0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


#: The gauge an autoscaler acts on (KEDA's prometheus trigger in deploy/kubernetes/): workers the fleet needs.
WORKERS_WANTED = "ditstream_workers_wanted"

#: The autoscaling signal of gateway mode, per fleet (every worker and gateway sharing one Redis
#: prefix), computed at scrape time from the supervisor's snapshot: heartbeats and the jobs stream
#: (``server/scale/autoscale.py``; the formula in docs/deploy.md, "Autoscaling"). Every gateway of a
#: fleet exports the same figures (a supervisor pass apart): take their ``max``. Name → help text.
FLEET_GAUGES: dict[str, str] = {
    "ditstream_fleet_sessions": "Live streams pinned to the fleet's workers, every gateway's (from the heartbeats; "
                                "never fewer than this gateway's own).",
    "ditstream_fleet_sessions_per_worker": "Live streams per live worker (absent while no worker is live).",
    "ditstream_fleet_session_capacity_per_worker": "Streams one live worker is sized for: the mean of their "
                                                   "--stream-capacity (this gateway's own setting while none is live).",
    "ditstream_fleet_jobs": "REST jobs not answered yet: queued plus pending.",
    "ditstream_fleet_jobs_per_worker": "REST jobs held by workers (pending) per live worker (absent while no worker "
                                       "is live).",
    "ditstream_fleet_job_capacity_per_worker": "REST jobs one live worker holds at once: the mean of their "
                                               "--max-jobs (this gateway's own setting while none is live).",
    "ditstream_fleet_jobs_queued": "REST jobs on the jobs stream that no worker has taken yet.",
    "ditstream_fleet_jobs_pending": "The consumer group's pending entries: REST jobs delivered to a worker and not "
                                    "acknowledged (running, or held by a dead worker until claimed).",
    "ditstream_fleet_queued_job_age_seconds": "Age of the oldest REST job no worker has taken yet (0 when none waits).",
    WORKERS_WANTED: "Workers the fleet needs: ceil(sessions / session capacity + pending jobs / job capacity), plus "
                    "ceil(queued jobs / job capacity) while the oldest queued job has waited longer than "
                    "AUTOSCALE_JOB_WAIT_S; at least 1 while a job is queued.",
}


class Metrics:
    """The metric objects of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_active = Gauge("ditstream_streams_active", "Live streams (every transport).", registry=r)
        self.streams_by_transport = Gauge("ditstream_streams_by_transport", "Live streams by transport.",
                                          ["transport"], registry=r)
        self.webrtc_viewers = Gauge("ditstream_webrtc_viewers", "WHEP viewers watching a WebRTC session.",
                                    registry=r)
        self.webrtc_dtls_failures = Counter(
            "ditstream_webrtc_dtls_failures_total",
            "WHIP publishers whose DTLS handshake failed, by cause (certificate_curve: an ECDSA curve our TLS "
            "library refuses, e.g. FFmpeg/GnuTLS's P-224; handshake: any other). The log says why, per session.",
            ["cause"], registry=r)
        self.frames = Counter("ditstream_frames_total", "Stream frames by outcome.", ["outcome"], registry=r)
        self.requests = Counter("ditstream_requests_total", "HTTP requests and WebSocket sessions by route and code.",
                                ["route", "code"], registry=r)
        self.rejected = Counter("ditstream_rejected_total", "Requests and streams refused, by reason.",
                                ["reason"], registry=r)
        self.queue_seconds = Histogram("ditstream_queue_seconds", "Time a frame or job waited for the engine.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("ditstream_inference_seconds", "Model time per frame or job.",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_seconds = Histogram("ditstream_e2e_seconds",
                                     "Server time from receiving a frame or request to sending its answer.",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead_seconds = Histogram("ditstream_server_overhead_seconds",
                                          "Server time per frame outside the model (e2e minus inference).",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ditstream_batch_size", "Samples per batched model call.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.model_failures = Counter(
            "ditstream_model_failures_total",
            "Failed model calls by stage (encode, denoise, decode; nonfinite: samples with NaN/inf output; "
            "tick: a tick failed outside a model call). Their frames and jobs got an error; the engine went on.",
            ["stage"], registry=r)
        self.failed_frames = Counter("ditstream_failed_frames_total",
                                     "Frames and jobs answered with an error because their model call failed.",
                                     registry=r)
        self.workers_up = Gauge("ditstream_workers_up", "Engines able to take work.", registry=r)
        self.outputs_active = Gauge("ditstream_outputs_active",
                                    "Outputs from the server (restreams, recordings) not finished yet.", registry=r)
        self.outputs_finished = Counter(
            "ditstream_outputs_finished_total",
            "Outputs from the server that finished, by outcome (ended: deleted or their session ended; failed: "
            "GET /v1/sessions/{id}/outputs and the log say why).", ["outcome"], registry=r)
        self.loop_lag = Histogram("ditstream_event_loop_lag_seconds",
                                  "How late the event loop woke a periodic timer (stall detector).",
                                  buckets=_LAG_BUCKETS, registry=r)
        self.loop_lag_max = Gauge("ditstream_event_loop_lag_max_seconds",
                                  "Largest event-loop lag seen since start.", registry=r)
        for outcome in ("processed", "skipped", "dropped", "failed"):
            self.frames.labels(outcome)
        for transport in ("websocket", "webrtc"):
            self.streams_by_transport.labels(transport)
        for cause in ("certificate_curve", "handshake"):
            self.webrtc_dtls_failures.labels(cause)
        for stage in ("encode", "denoise", "decode", "nonfinite", "tick"):
            self.model_failures.labels(stage)
        for outcome in ("ended", "failed"):
            self.outputs_finished.labels(outcome)

    def observe_batch(self, size: int, _seconds: float = 0.0) -> None:
        """``EngineCore.on_batch`` hook (called on the engine thread, once per denoise call)."""
        self.batch_size.observe(size)

    def observe_failure(self, stage: str, frames: int) -> None:
        """``EngineCore.on_failure`` hook (called on the engine thread)."""
        self.model_failures.labels(stage).inc()
        self.failed_frames.inc(frames)

    def render(self) -> bytes:
        return generate_latest(self.registry)
