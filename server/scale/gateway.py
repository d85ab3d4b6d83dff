"""The gateway: a runner with the ``EngineRunner`` API whose engines are workers behind Redis.

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
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from ditstream.engine.config import DEFAULT_SIZE_MULTIPLE, EngineConfig, StreamConfig
from ditstream.engine.errors import (
    CancelledError,
    EngineDeadError,
    GenerationError,
    OverloadedError,
    ValidationError,
)
from ditstream.engine.queues import LatestSlot, OutputQueue
from ditstream.engine.types import MetricsSink, StreamOutput, StreamStats
from ditstream.server.scale.config import (
    Backoff,
    ScaleConfig,
    connect,
    ensure_group,
    fields_get,
    redact,
    sid_str,
)
from ditstream.server.scale.messages import (
    FrameHeader,
    Heartbeat,
    JobMessage,
    JobResult,
    OutputHeader,
    SessionControl,
    SessionRecord,
    SessionReply,
    WireError,
    config_from_wire,
    config_to_wire,
    decode_image,
    encode_image,
)

logger = logging.getLogger(__name__)

#: Seconds a session record lives without the gateway refreshing it (a dead gateway's sessions expire).
SESSION_TTL_S = 30
#: Results kept after their future resolved, to recognise (and count) a second answer.
_RECENT = 4096


@dataclass
class _PendingJob:
    msg: JobMessage
    image: bytes
    future: Future


class _GatewayCore:
    """What the app reads from ``runner.core``: the engine settings (queue sizes)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config


class GatewayStreamHandle:
    """A session as the app sees it; its engine lives on whichever worker it is pinned to."""

    def __init__(self, runner: RedisGatewayRunner, sid: str, cfg: StreamConfig,
                 notify: Callable[[], None] | None) -> None:
        self._runner = runner
        self.id = sid
        self._config = cfg
        self.outputs: OutputQueue[StreamOutput] = OutputQueue(runner.engine_config.output_queue_size, notify)
        self.stats = StreamStats()
        self.slot: LatestSlot[tuple[np.ndarray | None, int, float]] = LatestSlot()
        self.worker = ""
        self.epoch = 0
        self.last_out = "0-0"
        self.closed = False
        self.refreshed = 0.0
        #: True while ``add_stream`` is pinning it: the supervisor leaves it alone (it would otherwise
        #: see a worker set but no record yet, "re-pin" it concurrently and split the session).
        self.pinning = False

    @property
    def config(self) -> StreamConfig:
        return self._config

    def submit(self, image: np.ndarray | None, seq: int = 0, ts: float = 0.0) -> bool:
        """Offer a frame; never blocks (the publisher thread sends it). True if one was replaced.

        Not refused while Redis or the worker is briefly gone: the slot keeps the newest frame and
        the session resumes when the supervisor has re-pinned it — a stream outlives an outage.
        """
        if self.closed or not self._runner.running:
            raise EngineDeadError("the gateway is not running")
        if image is None and self._config.mode == "img2img":
            raise ValidationError("img2img streams need an image in every frame", field="image")
        replaced = self.slot.put((image, seq, ts))
        if replaced:
            self.stats.dropped_inputs += 1
        self._runner.wake_publisher()
        return replaced

    def reconfigure(self, **changes: Any) -> Future:
        """Validate now; the future resolves to the config the worker applied."""
        try:
            cfg = self._runner.validate(self._config.replace(**changes))
        except TypeError as exc:
            raise ValidationError(f"unknown config key: {exc}") from exc
        self._config = cfg  # a re-pin opens the session with the newest config
        return self._runner.control(self, "reconfigure", cfg)

    def close(self) -> None:
        self._runner.close_session(self)


class RedisGatewayRunner:
    """The ``EngineClient`` of gateway mode (``server/engine_client.py``; see the module docstring)."""

    def __init__(self, cfg: ScaleConfig, engine: EngineConfig | None = None, *, job_timeout_s: float = 120.0,
                 gateway_id: str | None = None, open_timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.keys = cfg.keys
        self.engine_config = engine or EngineConfig()
        self.core = _GatewayCore(self.engine_config)
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
        self._lock = threading.Lock()
        self._sessions: dict[str, GatewayStreamHandle] = {}
        self._jobs: dict[str, _PendingJob] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()  # job -> worker that answered
        self._controls: dict[str, tuple[Future, str]] = {}  # request -> (future, session)
        self._outbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._publish_wake = threading.Event()
        self._repin_now = threading.Event()
        self.counters: dict[str, int] = {k: 0 for k in (
            "jobs_sent", "jobs_answered", "jobs_failed", "jobs_expired", "jobs_resent", "duplicate_answers",
            "sessions_pinned", "sessions_repinned", "frames_sent", "frames_received")}

    # ------------------------------------------------------------------------------ lifecycle
    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> RedisGatewayRunner:
        ecfg = EngineConfig(max_batch=settings.max_batch, output_queue_size=settings.output_queue_size,
                            max_pixels=settings.max_pixels, max_prompt_chars=settings.max_prompt_chars)
        return cls(ScaleConfig.from_settings(settings, **overrides), ecfg, job_timeout_s=settings.job_timeout_s)

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
            self.r.delete(self.replies)
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

    # ------------------------------------------------------------------------------ jobs
    def submit_job(self, cfg: StreamConfig, image: np.ndarray | None = None) -> Future:
        """Queue one image on the jobs stream; the future yields a ``StreamOutput`` (never blocks)."""
        self.check_alive()
        cfg = self.validate(cfg)
        if image is None and cfg.mode == "img2img":
            raise ValidationError("img2img needs an input image", field="image")
        meta, data = encode_image(image, "raw") if image is not None else (None, b"")
        msg = JobMessage(reply_to=self.replies, config=config_to_wire(cfg), image=meta,
                         deadline=time.time() + self.job_timeout_s)
        future: Future = Future()
        with self._lock:
            self._jobs[msg.job] = _PendingJob(msg, data, future)
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
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
        fut = pending.future
        if fut.done():
            return
        if res.error is not None:
            self.counters["jobs_failed"] += 1
            fut.set_exception(res.error.to_exception())
            return
        try:
            image = decode_image(res.image, img, max_pixels=self.engine_config.max_pixels) if res.image else None
        except Exception as exc:
            fut.set_exception(GenerationError(f"unreadable result from {res.worker}: {exc}"))
            return
        self.counters["jobs_answered"] += 1
        fut.set_result(StreamOutput(stream_id=res.job, seq=0, ts=0.0, image=image, skipped=res.skipped,
                                    timings=dict(res.timings)))

    # ------------------------------------------------------------------------------ sessions
    def add_stream(self, cfg: StreamConfig, notify: Callable[[], None] | None = None,
                   timeout: float | None = 60.0) -> GatewayStreamHandle:
        """Pin a new session to the least busy live worker (blocking: call it off the event loop)."""
        self.check_alive()
        cfg = self.validate(cfg)
        handle = GatewayStreamHandle(self, f"s-{uuid.uuid4().hex[:16]}", cfg, notify)
        with self._lock:
            self._sessions[handle.id] = handle
        self._outbox.put(("wake-reader", None))  # the reader adds the new output stream to its XREAD
        deadline = time.monotonic() + (timeout or self.open_timeout_s)
        tried: set[str] = set()
        handle.pinning = True
        try:
            while True:
                if self._pin(handle, exclude=tried):
                    return handle
                tried.add(handle.worker)
                if time.monotonic() > deadline or not (set(self.workers) - tried):
                    raise OverloadedError("no worker could open the stream", reason="no_worker")
        except BaseException:
            self.close_session(handle)  # also tells a worker that opened it late, and drops the record
            raise
        finally:
            handle.pinning = False

    def _pick_worker(self, exclude: set[str]) -> str | None:
        live = [hb for wid, hb in self.workers.items() if wid not in exclude and hb.engine_alive]
        if not live:
            return None
        with self._lock:
            mine: dict[str, int] = {}
            for h in self._sessions.values():
                mine[h.worker] = mine.get(h.worker, 0) + 1
        return min(live, key=lambda hb: (max(hb.sessions, mine.get(hb.worker, 0)), hb.jobs_inflight)).worker

    def _pin(self, handle: GatewayStreamHandle, exclude: set[str]) -> bool:
        """Open ``handle`` on a live worker and record where; raises the worker's validation errors."""
        wid = self._pick_worker(exclude)
        if wid is None:
            return False
        handle.epoch += 1
        handle.worker = wid
        rec = SessionRecord(session=handle.id, gateway=self.id, worker=wid, epoch=handle.epoch,
                            config=config_to_wire(handle.config))
        self.r.set(self.keys.session(handle.id), rec.dump(), ex=SESSION_TTL_S)
        handle.refreshed = time.monotonic()
        fut = self._send_control(handle, "open", handle.config, direct=True)
        try:
            applied = fut.result(self.open_timeout_s)
        except TimeoutError:
            logger.warning("worker %s did not open session %s in %.0f s", wid, handle.id, self.open_timeout_s)
            with self._lock:  # forget the request: a late reply is ignored, nothing leaks
                for req in [k for k, (f, _sid) in self._controls.items() if f is fut]:
                    self._controls.pop(req)
            return False
        except ValidationError:
            raise
        except Exception as exc:
            logger.warning("worker %s could not open session %s: %s", wid, handle.id, exc)
            return False
        handle._config = applied
        self.counters["sessions_pinned"] += 1
        logger.info("session %s pinned to %s (epoch %d)", handle.id, wid, handle.epoch)
        return True

    def control(self, handle: GatewayStreamHandle, kind: str, cfg: StreamConfig) -> Future:
        return self._send_control(handle, kind, cfg, direct=False)

    def _send_control(self, handle: GatewayStreamHandle, kind: str, cfg: StreamConfig | None,
                      direct: bool) -> Future:
        msg = SessionControl(kind=kind, session=handle.id, reply_to=self.replies, epoch=handle.epoch,  # type: ignore[arg-type]
                             config=config_to_wire(cfg) if cfg is not None else None)
        fut: Future = Future()
        with self._lock:
            self._controls[msg.request] = (fut, handle.id)
        if direct:  # called off the event loop (pinning): send now
            self.r.xadd(self.keys.worker_control(handle.worker), {"m": msg.dump()}, maxlen=1000, approximate=True)
            self.r.expire(self.keys.worker_control(handle.worker), 3600)
        else:
            self._outbox.put(("control", (handle.worker, msg)))
            self._publish_wake.set()
        return fut

    def _on_session_reply(self, rep: SessionReply) -> None:
        with self._lock:
            entry = self._controls.pop(rep.request, None)
        if entry is None or entry[0].done():
            return
        if rep.error is not None:
            entry[0].set_exception(rep.error.to_exception())
        else:
            entry[0].set_result(config_from_wire(rep.config or {}))

    def close_session(self, handle: GatewayStreamHandle) -> None:
        """Forget the session here and tell its worker; never blocks (safe on the event loop)."""
        if handle.closed:
            return
        handle.closed = True
        with self._lock:
            self._sessions.pop(handle.id, None)
        handle.outputs.close()
        self._outbox.put(("close", (handle.worker, handle.id, handle.epoch)))
        self._publish_wake.set()

    def _on_output(self, handle: GatewayStreamHandle, fields: dict[Any, Any]) -> None:
        head = OutputHeader.load(fields_get(fields, "m") or b"")
        error = head.error.to_exception() if head.error is not None else None
        image = None
        if error is not None:  # the worker's model call failed: relayed as the in-band error for this seq
            handle.stats.failed += 1
        else:
            if head.image is None:
                raise WireError(f"output {head.seq} has neither an image nor an error")
            image = decode_image(head.image, fields_get(fields, "img") or b"",
                                 max_pixels=self.engine_config.max_pixels)
            if head.skipped:
                handle.stats.skipped += 1
            else:
                handle.stats.processed += 1
        before = handle.outputs.dropped
        handle.outputs.put(StreamOutput(stream_id=handle.id, seq=head.seq, ts=head.ts, image=image,
                                        skipped=head.skipped, timings=dict(head.timings), error=error))
        handle.stats.dropped_outputs += handle.outputs.dropped - before
        self.counters["frames_received"] += 1

    # ------------------------------------------------------------------------------ threads
    def _publisher_loop(self) -> None:
        backoff = Backoff(f"gateway {self.id} publisher", self._stop)
        while not self._stop.is_set():
            self._publish_wake.wait(0.1)
            self._publish_wake.clear()
            try:
                self._flush_outbox()
                self._send_frames()
                backoff.ok()
            except self._conn_errors() as exc:
                backoff.failed(exc)

    def _flush_outbox(self) -> None:
        """Send queued jobs/controls/cancels; an item that fails to send is put back first."""
        pipe = self.r.pipeline(transaction=False)
        items: list[tuple[str, Any]] = []
        while True:
            try:
                kind, item = self._outbox.get_nowait()
            except queue.Empty:
                break
            items.append((kind, item))
            if kind == "job":
                with self._lock:
                    pending = self._jobs.get(item)
                if pending is None:
                    continue
                fields: dict[str, Any] = {"m": pending.msg.dump()}
                if pending.image:
                    fields["img"] = pending.image
                pipe.xadd(self.keys.jobs, fields)
                self.counters["jobs_sent"] += 1
            elif kind == "cancel":
                pipe.set(self.keys.done(item), f"cancelled-by-{self.id}", nx=True, ex=self.cfg.done_ttl_s)
            elif kind == "control":
                wid, msg = item
                pipe.xadd(self.keys.worker_control(wid), {"m": msg.dump()}, maxlen=1000, approximate=True)
            elif kind == "close":
                wid, sid, epoch = item
                if wid:
                    msg = SessionControl(kind="close", session=sid, epoch=epoch)
                    pipe.xadd(self.keys.worker_control(wid), {"m": msg.dump()}, maxlen=1000, approximate=True)
                pipe.delete(self.keys.session(sid), self.keys.frames_in(sid), self.keys.frames_out(sid))
            elif kind == "wake-reader":
                pipe.xadd(self.replies, {"m": b"{}"}, maxlen=self.cfg.replies_len, approximate=True)
        if not items:
            return
        try:
            pipe.execute()
        except BaseException:
            for it in items:
                self._outbox.put(it)
            raise

    def _send_frames(self) -> None:
        with self._lock:
            handles = list(self._sessions.values())
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for h in handles:
            item = h.slot.take()
            if item is None or not h.worker:
                continue
            image, seq, ts = item
            meta, data = encode_image(image, self.cfg.frame_codec, self.cfg.jpeg_quality) if image is not None \
                else (None, b"")
            head = FrameHeader(seq=seq, ts=ts, image=meta)
            pipe.xadd(self.keys.frames_in(h.id), {"m": head.dump(), "img": data},
                      maxlen=self.cfg.frames_in_len, approximate=False)
            pipe.expire(self.keys.frames_in(h.id), 3600)
            n += 1
        if n:
            pipe.execute()
            self.counters["frames_sent"] += n

    def _reader_loop(self) -> None:
        backoff = Backoff(f"gateway {self.id} reader", self._stop)
        last_reply = "0-0"  # the stream is this gateway's own (a fresh id), so read it all
        while not self._stop.is_set():
            with self._lock:
                handles = {self.keys.frames_out(h.id): h for h in self._sessions.values()}
            streams = {self.replies: last_reply, **{k: h.last_out for k, h in handles.items()}}
            try:
                resp = self.r.xread(streams, block=500)
                backoff.ok()
            except self._conn_errors() as exc:
                backoff.failed(exc)
                continue
            for key, entries in resp or ():
                name = sid_str(key)
                for entry_id, fields in entries:
                    eid = sid_str(entry_id)
                    try:
                        if name == self.replies:
                            last_reply = eid
                            self._on_reply(fields)
                        elif name in handles:
                            handles[name].last_out = eid
                            self._on_output(handles[name], fields)
                    except Exception as exc:
                        logger.error("gateway %s: unreadable entry %s on %s: %s", self.id, eid, name, exc)

    def _on_reply(self, fields: dict[Any, Any]) -> None:
        raw = fields_get(fields, "m") or b"{}"
        if raw == b"{}":
            return
        if b'"kind":"result"' in raw:
            self._on_result(JobResult.load(raw), fields_get(fields, "img") or b"")
        else:
            self._on_session_reply(SessionReply.load(raw))

    def _supervisor_loop(self) -> None:
        backoff = Backoff(f"gateway {self.id} supervisor", self._stop)
        while not self._stop.is_set():
            try:
                self._supervise_once()
                backoff.ok()
            except self._conn_errors() as exc:
                self.redis_ok = False
                backoff.failed(exc)
                continue
            self._stop.wait(self.cfg.supervise_s)

    def _supervise_once(self) -> None:
        """One pass: workers, Redis restarts, orphaned sessions, overdue jobs."""
        try:
            run_id = str(self.r.info("server").get("run_id"))
            ensure_group(self.r, self.keys)
        except self._conn_errors():
            self.redis_ok = False
            self.workers = {}
            if not self._started or self._stop.is_set():
                return
            raise
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        self.redis_ok = True
        self._refresh_workers()
        if restarted:
            logger.warning("gateway %s: Redis restarted (its data is gone); re-sending %d job(s), re-pinning "
                           "%d session(s)", self.id, len(self._jobs), len(self._sessions))
            with self._lock:
                jobs = list(self._jobs)
            for job in jobs:
                self._outbox.put(("job", job))
                self.counters["jobs_resent"] += 1
            self._publish_wake.set()
        self._check_sessions()
        self._expire_jobs()

    def _refresh_workers(self) -> None:
        ids = sorted(sid_str(w) for w in self.r.smembers(self.keys.workers))
        raws = self.r.mget([self.keys.worker(w) for w in ids]) if ids else []
        live: dict[str, Heartbeat] = {}
        gone = []
        for wid, raw in zip(ids, raws):
            if raw is None:
                gone.append(wid)
                continue
            with contextlib.suppress(Exception):
                hb = Heartbeat.load(raw)
                if hb.engine_alive:
                    live[wid] = hb
        if gone:
            self.r.srem(self.keys.workers, *gone)
        lost = set(self.workers) - set(live)
        if lost:
            logger.warning("gateway %s: worker(s) %s stopped beating", self.id, ", ".join(sorted(lost)))
        self.workers = live

    def _check_sessions(self) -> None:
        """Re-pin sessions whose worker is gone or whose record vanished; refresh the others' TTL."""
        with self._lock:
            handles = [h for h in self._sessions.values() if h.worker and not h.pinning]
        if not handles:
            return
        exists = self.r.pipeline(transaction=False)
        for h in handles:
            exists.exists(self.keys.session(h.id))
        present = exists.execute()
        now = time.monotonic()
        for h, ok in zip(handles, present):
            if h.closed or h.pinning:
                continue
            if h.worker in self.workers and ok:
                if now - h.refreshed > SESSION_TTL_S / 3:
                    self.r.expire(self.keys.session(h.id), SESSION_TTL_S)
                    h.refreshed = now
                continue
            old = h.worker
            if not self.workers:
                continue  # nobody to move it to yet; try again next pass
            logger.warning("gateway %s: session %s lost its worker %s; re-pinning", self.id, h.id, old)
            try:
                moved = self._pin(h, exclude={old} if len(self.workers) > 1 else set())
            except ValidationError as exc:
                logger.error("session %s cannot be re-opened: %s", h.id, exc.message)
                continue
            if moved:
                self.counters["sessions_repinned"] += 1
                self._resolve_controls(h)
            else:  # _pin recorded the new worker before it failed to open: drop it so the next pass retries
                self.r.delete(self.keys.session(h.id))

    def _resolve_controls(self, handle: GatewayStreamHandle) -> None:
        """A re-pinned session was opened with its newest config: settle its pending reconfigures."""
        with self._lock:
            mine = [r for r, (_f, sid) in self._controls.items() if sid == handle.id]
            futures = [self._controls.pop(r)[0] for r in mine]
        for f in futures:
            if not f.done():
                f.set_result(handle.config)

    def _expire_jobs(self) -> None:
        now = time.time()
        with self._lock:
            late = [j for j in self._jobs.values() if now > j.msg.deadline + 1.0]
        for j in late:
            self.counters["jobs_expired"] += 1
            if not j.future.done():
                j.future.set_exception(GenerationError(f"no result within the {self.job_timeout_s:.0f} s deadline"))

    @staticmethod
    def _conn_errors() -> tuple[type[BaseException], ...]:
        import redis

        return (redis.ConnectionError, redis.TimeoutError)

    # ------------------------------------------------------------------------------ metrics
    def bind_metrics(self, metrics: MetricsSink) -> None:
        """Export per-worker figures (from heartbeats) and gateway counters on the app's /metrics."""
        metrics.registry.register(_WorkerCollector(self))


class _WorkerCollector:
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
