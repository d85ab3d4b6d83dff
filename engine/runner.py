"""The thread that runs an ``EngineCore``, and the thread-safe handles the server uses.

The loop drains an inbox of typed control messages (add, reconfigure, remove, job, stop), applies
them between ticks, steps the core while any stream has work and sleeps on an event otherwise.
Before a tick it asks the core's batch policy (``engine.batching``) whether to hold it for frames
expected soon; it then waits on the same event, so each arriving frame re-asks at once.
Callers never touch torch: frames go into a stream's latest-wins slot from any thread, outputs come
out of its bounded queue, and ``notify`` callbacks (e.g. ``loop.call_soon_threadsafe``) wake
consumers. A failed model call fails only its own frames (the core emits them as error outputs;
a job's future gets the ``GenerationError``) and the loop goes on; an error outside the model calls
fails the frames in flight that tick, and the loop goes on too. Only an unrecoverable device error
(``errors.is_fatal_device_error``) ends the loop, loudly: every waiting job fails with
``EngineDeadError``, every output queue closes and ``alive`` turns false (``/health`` then says 503).

Before its first tick the thread warms the backend for every shape it will be called with (compile,
CUDA-graph capture: on this thread, where the graphs will replay); ``ready`` turns true only after
that, and ``warming`` lists what is left.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ditstream.engine.config import EngineConfig, ModelConfig, StreamConfig
from ditstream.engine.core import EngineCore, offer
from ditstream.engine.errors import CancelledError, EngineDeadError, ValidationError, is_fatal_device_error
from ditstream.engine.limits import EngineLimits, check_input, ensure_valid, validate_stream
from ditstream.engine.stream import StreamState
from ditstream.engine.types import Frame, MetricsSink, StreamOutput, StreamStats

logger = logging.getLogger(__name__)


class Op(enum.Enum):
    ADD = "add"
    RECONFIGURE = "reconfigure"
    REMOVE = "remove"
    JOB = "job"
    STOP = "stop"


@dataclass
class Control:
    op: Op
    stream_id: str | None = None
    config: StreamConfig | None = None
    frame: Frame | None = None
    notify: Callable[[], None] | None = None
    done: Future = field(default_factory=Future)


class StreamHandle:
    """A live stream, as seen from outside the engine thread (the server's ``EngineStream``)."""

    #: Frames come as pixels and outputs leave as pixels: the server's codec threads code them.
    takes_encoded = False

    def __init__(self, runner: EngineRunner, state: StreamState) -> None:
        self._runner = runner
        self._state = state
        self.id = state.id

    @property
    def config(self) -> StreamConfig:
        return self._state.config

    @property
    def outputs(self):
        return self._state.outputs

    @property
    def stats(self) -> StreamStats:
        return self._state.stats

    def submit(self, image: np.ndarray | None, seq: int = 0, ts: float = 0.0) -> bool:
        """Offer a frame; never blocks. Returns True if an unprocessed frame was replaced (dropped)."""
        self._runner.check_alive()
        if self._state.outputs.closed:
            raise CancelledError("the stream is closed")
        # Straight into the stream's own inbox (thread-safe), never through the core's tables: the
        # engine thread may be adding or removing streams right now.
        replaced = offer(self._state, Frame(image=image, seq=seq, ts=ts, received_at=time.perf_counter()))
        self._runner.wake()
        return replaced

    def submit_encoded(self, data: bytes, seq: int, ts: float, fmt: str, width: int, height: int) -> bool:
        """Not here (``takes_encoded`` is False): this engine takes decoded frames (``submit``)."""
        raise NotImplementedError("an in-process stream takes decoded frames: use submit")

    def code_outputs(self, quality: int) -> None:
        """Nothing to do: outputs are pixels, coded by whoever consumes them."""

    def reconfigure(self, **changes: Any) -> Future:
        """Validate ``changes`` now (raises ``ValidationError``); the future resolves to the applied config."""
        cfg = ensure_valid(_apply(self.config, changes), self._runner.limits)
        return self._runner.send(Control(Op.RECONFIGURE, stream_id=self.id, config=cfg))

    def close(self) -> None:
        """Remove the stream; work in flight is dropped. Safe to call twice or after engine death."""
        if self._runner.alive:
            self._runner.send(Control(Op.REMOVE, stream_id=self.id))
        else:
            self._state.outputs.close()


def _apply(cfg: StreamConfig, changes: dict[str, Any]) -> StreamConfig:
    try:
        return cfg.replace(**changes)
    except TypeError as exc:
        raise ValidationError(f"unknown config key: {exc}") from exc


class EngineRunner:
    """Owns the engine thread. ``start()``, then add streams or jobs; ``stop()`` at shutdown."""

    def __init__(self, core: EngineCore, name: str = "ditstream-engine",
                 warmup_sizes: list[tuple[int, int]] | None = None) -> None:
        self.core = core
        self.name = name
        #: (width, height) to warm when the backend's limits name none (default: the model's size).
        self.warmup_sizes = warmup_sizes
        #: Shapes still to warm, e.g. ``["batch 1 at 512x512", ...]``; empty once warm.
        self.warming: list[str] = []
        self._warm = threading.Event()
        self._shapes: list[tuple[int, int, int]] = []
        self._abort_warmup = False
        self._inbox: queue.SimpleQueue[Control] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._jobs: dict[str, Future] = {}
        self._running = False
        self.error: BaseException | None = None
        self.ticks = 0
        self.info: dict[str, Any] = {}

    @classmethod
    def from_config(cls, model: ModelConfig, engine: EngineConfig | None = None) -> EngineRunner:
        """Load the model and backend named in ``model`` and wrap them in a runner (not started)."""
        from ditstream.engine.backends import create_backend
        from ditstream.engine.loader import load_components
        from ditstream.engine.prompt_cache import PromptCache

        components = load_components(model)
        backend = create_backend(model.backend, components, model.backend_options)
        prompts = PromptCache(components, model.prompt_cache_size)
        runner = cls(EngineCore(components, backend, prompts, engine))
        runner.info = {"model": model.model, "backend": backend.name, "device": str(components.device),
                       "dtype": str(components.dtype).replace("torch.", ""),
                       "size_multiple": runner.core.size_multiple, "defaults": components.defaults or {},
                       "limits": backend.limits.as_dict(), "loras": dict(components.loras)}
        return runner

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EngineRunner:
        if self._thread is None:
            self._running = True
            self._shapes = self.warmup_shapes()
            self.warming = [f"batch {b} at {w}x{h}" for b, h, w in self._shapes]
            if not self._shapes:  # nothing to warm: ready as soon as the thread runs
                self._warm.set()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._abort_warmup = True
        if self._thread.is_alive():
            self.send(Control(Op.STOP))
            self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._running and self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """Alive and warm: every shape the engine will call has been prepared."""
        return self.alive and self._warm.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until warm-up is done (True) or the engine died or ``timeout`` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._warm.wait(0.1):
            if self._thread is None or not self._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return self.alive

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        """``(batch, height, width)`` to warm: the backend's profile sizes (else ``warmup_sizes``, else
        the model's own size) at every batch its calls will have; none when the backend is warm."""
        backend = self.core.backend
        if backend.warm:
            return []
        limits = backend.limits
        sizes = list(limits.sizes) or self.warmup_sizes
        if not sizes:
            d = self.core.components.defaults or {}
            sizes = [(int(d.get("width", 512)), int(d.get("height", 512)))]
        batches = [b for b in backend.warmup_batches(self.core.max_batch) if b >= limits.min_batch]
        return [(b, h, w) for w, h in sizes for b in batches]

    def _warm_up(self) -> None:
        """Run on the engine thread before the first tick (CUDA graphs replay on the thread that made them)."""
        shapes, backend = self._shapes, self.core.backend if self._shapes else None
        if backend is None:
            return
        t0 = time.perf_counter()
        for i, shape in enumerate(shapes):
            if self._abort_warmup:
                return
            logger.info("warming up %s (%d/%d): %s", backend.name, i + 1, len(shapes), self.warming[0])
            backend.warmup([shape])
            self.warming = self.warming[1:]
        backend.warm = True
        logger.info("%s backend warm: %d shape(s) in %.1f s", backend.name, len(shapes), time.perf_counter() - t0)
        self._warm.set()

    def check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        if not self.alive:
            raise EngineDeadError("the engine is not running")

    def wake(self) -> None:
        if not self._wake.is_set():  # called per frame: skip the lock when already set
            self._wake.set()

    def send(self, msg: Control) -> Future:
        self.check_alive()
        self._inbox.put(msg)
        self._wake.set()
        return msg.done

    @property
    def limits(self) -> EngineLimits:
        """What this engine accepts (its core's bounds, size multiple, backend profile, LoRA names)."""
        return self.core.engine_limits

    def validate(self, cfg: StreamConfig) -> StreamConfig:
        """``validate_stream`` against ``limits`` (for a caller without a server edge: a worker, a library)."""
        return validate_stream(cfg, self.limits)

    # ------------------------------------------------------------------ public API
    def add_stream(self, cfg: StreamConfig, notify: Callable[[], None] | None = None,
                   timeout: float | None = 60.0) -> StreamHandle:
        """Validate ``cfg`` (raises ``ValidationError``), add the stream and return its handle.

        Blocks until the engine thread has built the stream's plan (prompt encoded once, cached):
        call it from a worker thread, not the event loop. A config an edge validated is taken on trust.
        """
        cfg = ensure_valid(cfg, self.limits)
        state = self.send(Control(Op.ADD, config=cfg, notify=notify)).result(timeout)
        return StreamHandle(self, state)

    def submit_job(self, cfg: StreamConfig, image: np.ndarray | None = None,
                   encode: tuple[str, int] | None = None) -> Future:
        """A one-shot generation batched with the live streams; the future yields a ``StreamOutput``.

        Cancelling the future removes the job from the engine before its next tick. ``encode`` is not
        used: in process the output stays pixels and the caller codes it in its own pool.
        """
        cfg = ensure_valid(cfg, self.limits)
        check_input(cfg, image)
        frame = Frame(image=image, received_at=time.perf_counter())
        return self.send(Control(Op.JOB, config=cfg, frame=frame))

    # ------------------------------------------------------------------ EngineClient (server/engine_client.py)
    @property
    def engine_config(self) -> EngineConfig:
        return self.core.config

    @property
    def workers_up(self) -> int:
        return 1 if self.ready else 0

    def health(self) -> dict[str, Any]:
        return {"mode": "engine"}

    def bind_metrics(self, metrics: MetricsSink) -> None:
        self.core.on_batch = metrics.observe_batch
        self.core.on_failure = metrics.observe_failure

    def prefer_warmup_size(self, width: int, height: int) -> None:
        if self.warmup_sizes is None:
            self.warmup_sizes = [(width, height)]

    def stats(self) -> dict[str, Any]:
        streams = [s for s in self.core.streams.values() if not s.one_shot]
        return {"streams": len(streams), "jobs": len(self._jobs), "ticks": self.ticks, "alive": self.alive,
                "ready": self.ready, "warming": list(self.warming),
                "failed_frames": self.core.failed_frames, "failed_calls": dict(self.core.failed_calls)}

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        try:
            self._warm_up()
            while self._running:
                self._drain_inbox()
                if not self._running:
                    break
                self._reap_cancelled_jobs()
                if self.core.has_work():
                    hold = self.core.batch_wait(time.perf_counter())
                    if hold > 0:  # frames expected soon: let them join this tick (an arrival wakes us)
                        self._wake.wait(hold)
                        self._wake.clear()
                        continue
                    outputs = self._step()
                    self.ticks += 1
                    self._resolve_jobs(outputs)
                else:
                    self._wake.wait(self.core.config.idle_wait_s)
                    self._wake.clear()
        except BaseException as exc:
            logger.critical("engine loop died after %d ticks (%s); every stream and job on it ends",
                            self.ticks, "unrecoverable device error" if is_fatal_device_error(exc) else "bug",
                            exc_info=exc)
            self.error = exc
        finally:
            self._running = False
            self._fail_everything()

    def _step(self) -> list[StreamOutput]:
        """One tick; model-call failures are handled inside the core, anything else fails this tick only."""
        try:
            return self.core.step()
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise
            logger.exception("engine tick %d failed outside a model call; failing the frames in flight", self.ticks)
            return self.core.fail_in_flight(exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._apply(msg)
            except Exception as exc:  # a bad control message fails that message only
                if not msg.done.done():
                    msg.done.set_exception(exc)

    def _apply(self, msg: Control) -> None:
        if msg.op is Op.STOP:
            self._running = False
            msg.done.set_result(None)
        elif msg.op is Op.ADD:
            msg.done.set_result(self.core.add(msg.config, notify=msg.notify))
        elif msg.op is Op.RECONFIGURE:
            if msg.stream_id not in self.core.streams:
                raise ValidationError(f"stream {msg.stream_id} is closed")
            msg.done.set_result(self.core.reconfigure(msg.stream_id, msg.config))
        elif msg.op is Op.REMOVE:
            self.core.remove(msg.stream_id)
            msg.done.set_result(None)
        elif msg.op is Op.JOB:
            if msg.done.cancelled():  # cancelled while waiting in the inbox
                return
            state = self.core.add(msg.config, one_shot=True)
            self._jobs[state.id] = msg.done
            self.core.submit(state.id, msg.frame)

    def _reap_cancelled_jobs(self) -> None:
        for sid in [sid for sid, fut in self._jobs.items() if fut.cancelled()]:
            self._jobs.pop(sid)
            self.core.remove(sid)

    def _resolve_jobs(self, outputs: list[StreamOutput]) -> None:
        for out in outputs:
            fut = self._jobs.pop(out.stream_id, None)
            if fut is not None:
                self.core.remove(out.stream_id)
                if fut.done():
                    continue
                if out.error is not None:
                    fut.set_exception(out.error)
                else:
                    fut.set_result(out)

    def _fail_everything(self) -> None:
        err = EngineDeadError(f"the engine has stopped: {self.error!r}") if self.error else CancelledError(
            "the engine was stopped")
        for fut in self._jobs.values():
            if not fut.done():
                fut.set_exception(err)
        self._jobs.clear()
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if not msg.done.done():
                msg.done.set_exception(err)
        for state in list(self.core.streams.values()):
            state.outputs.close()
