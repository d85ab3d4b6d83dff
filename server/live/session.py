"""One live stream's life, whatever carries it: the WebSocket (``ws.py``) and WebRTC
(``webrtc_session.py``) only move bytes and messages into and out of a ``LiveSession``.

It owns, for one stream: admission (the permit taken at the door, given back at close), registration
(``state.sessions`` and ``state.live``, the live-stream gauges), its outputs (``outputs.py``: restreams
and recordings, fed each output as it leaves), the engine stream itself (opened off the loop, closed
once), the config (validated once per change, by ``wanted_config``), the txt2img ticker (server-made
frames, numbered like the client's), the bookkeeping of each output (metrics, the one
glass-to-glass definition of ``timing.py``, an in-band error for a failed frame) and the close.

The transport gives it three things: the object shutdown asks to close (``Closable``), the engine's
``notify`` (the transport's output path), and optionally what to do when the mode flips.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import DitstreamError, GenerationError, OverloadedError, ValidationError
from ditstream.engine.types import StreamOutput
from ditstream.server.api.admission import Permit
from ditstream.server.api.state import AppState
from ditstream.server.engine_client import EngineStream
from ditstream.server.errors import ws_error
from ditstream.server.live import timing
from ditstream.server.live.outputs import SessionOutputs
from ditstream.server.live.protocol import ConfigMessage
from ditstream.server.live.timing import Arrivals

logger = logging.getLogger(__name__)


class Closable(Protocol):
    """What shutdown (``app._drain_sessions``) finds in ``state.sessions``: a transport to close."""

    def request_close(self, code: int, reason: str) -> None: ...


def admit(state: AppState) -> Permit:
    """The door of every live stream: refused while shutting down or without an engine, else a
    stream permit (``OverloadedError`` at ``--max-streams``), held until ``LiveSession.close``."""
    if state.shutting_down:
        raise OverloadedError("server is shutting down", retry_after=state.settings.retry_after_s,
                              reason="shutting_down")
    state.require_engine()
    return state.admission.streams.acquire()


def wanted_config(state: AppState, current: StreamConfig, msg: ConfigMessage) -> StreamConfig:
    """The config a ``config`` message asks for, checked (the error names the field); nothing applied.

    The one validation of a live config change, whichever way it came (WebSocket message, WebRTC
    data channel or WHIP query, ``POST /v1/sessions/{id}/config``).
    """
    if msg.fps is not None and msg.fps > state.settings.max_fps:
        raise ValidationError(f"fps is {msg.fps}; the limit is {state.settings.max_fps}", field="fps")
    try:
        wanted = current.replace(**msg.engine_changes())
    except TypeError as exc:
        raise ValidationError(f"bad config: {exc}", field="config") from exc
    return state.validate(wanted)  # names the field on error


@dataclass(frozen=True)
class Change:
    """A config change accepted: the config now asked for, and the engine's answer (None: nothing
    changed for the engine). ``reshapes``: size or mode change, so frames must wait for it."""

    config: StreamConfig
    applied: asyncio.Future | None
    reshapes: bool


@dataclass(frozen=True)
class OutputTimings:
    """Where an output's time went, in seconds (``server_s``: glass-to-glass, ``timing.py``)."""

    decode_s: float
    queue_s: float
    inference_s: float
    encode_s: float
    server_s: float

    def as_ms(self) -> dict[str, float]:
        """The WebSocket header's ``timings``."""
        return {"decode_ms": _ms(self.decode_s), "queue_ms": _ms(self.queue_s),
                "inference_ms": _ms(self.inference_s), "encode_ms": _ms(self.encode_s),
                "server_ms": _ms(self.server_s)}


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class LiveSession:
    """One live stream (see the module docstring). Event loop only, except ``arrivals``."""

    def __init__(self, state: AppState, permit: Permit, transport: str, owner: Closable,
                 notify: Callable[[], None], on_mode: Callable[[bool], None] | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self.runner = state.require_engine()
        self.loop = asyncio.get_running_loop()
        self.transport = transport  # the ``streams_by_transport`` label
        self._permit = permit
        self._owner = owner
        self._notify = notify
        self._on_mode = on_mode
        self.handle: EngineStream | None = None
        #: Its restreams and recordings (``outputs.py``), once open: fed each output frame as it leaves.
        self.outputs: SessionOutputs | None = None
        #: The latest config asked for (the engine's copy may lag by one change).
        self.config = StreamConfig()
        self.fps = self.settings.default_fps
        #: Arrival times by seq, and the seq the next server-made (or unnumbered) frame gets.
        self.arrivals = Arrivals()
        self._ticker: asyncio.Task | None = None
        self._out_dropped = 0
        self._registered = False
        self.closed = False

    # ------------------------------------------------------------------------------ open, close
    def first_config(self, msg: ConfigMessage | None = None) -> StreamConfig:
        """The stream's config at open: the server's defaults, changed by ``msg``; validated."""
        start = StreamConfig(**self.state.stream_defaults())
        if msg is None:
            return self.state.validate(start)
        cfg = wanted_config(self.state, start, msg)
        if msg.fps is not None:
            self.fps = msg.fps
        return cfg

    async def open(self, cfg: StreamConfig) -> EngineStream:
        """Open the engine stream (off the loop: the engine may take a moment) and register it."""
        adding = self.loop.run_in_executor(None, self.runner.add_stream, cfg, self._notify)
        try:
            handle = await asyncio.shield(adding)
        except asyncio.CancelledError:  # the client left while the engine built the stream: undo it
            adding.add_done_callback(_close_if_added)
            raise
        self.handle, self.config = handle, cfg
        self._registered = True
        self.state.sessions.add(self._owner)
        self.outputs = SessionOutputs(self.settings, handle.id, self.metrics)
        self.state.live[handle.id] = self
        self.metrics.streams_active.inc()
        self.metrics.streams_by_transport.labels(self.transport).inc()
        logger.debug("%s stream %s opened", self.transport, handle.id)
        return handle

    def close(self) -> None:
        """End the stream (idempotent): ticker, engine stream (its queued work dropped), gauges, permit."""
        if self.closed:
            return
        self.closed = True
        self._stop_ticker()
        if self.outputs is not None:  # they end with the stream (queued frames written, files closed)
            self.outputs.close()
            self.state.live.pop(self.outputs.session, None)
        if self.handle is not None:
            with contextlib.suppress(DitstreamError):
                self.handle.close()
            logger.debug("stream %s closed (%s)", self.handle.id, self.handle.stats.as_dict())
        if self._registered:
            self.metrics.streams_active.dec()
            self.metrics.streams_by_transport.labels(self.transport).dec()
            self.state.sessions.discard(self._owner)
        self._permit.release()

    # ------------------------------------------------------------------------------ config
    def change(self, msg: ConfigMessage) -> Change:
        """Validate a config message (errors name the field; nothing applied) and pass it on."""
        assert self.handle is not None
        wanted = wanted_config(self.state, self.config, msg)
        if msg.fps is not None:
            self.fps = msg.fps
        old, self.config = self.config, wanted
        if wanted == old:
            return Change(wanted, None, False)
        reshapes = (wanted.width, wanted.height, wanted.mode) != (old.width, old.height, old.mode)
        # Every field, not only the changes: the engine's copy may not have applied the previous
        # change yet, and a diff against it would undo that one.
        return Change(wanted, asyncio.wrap_future(self.handle.reconfigure(**wanted.fields())), reshapes)

    def applied(self, cfg: StreamConfig) -> None:
        """The engine runs ``cfg`` now: txt2img starts the ticker (and tells the transport), img2img stops it."""
        txt = cfg.mode == "txt2img"
        if self._on_mode is not None:
            self._on_mode(txt)
        if txt and self._ticker is None and not self.closed:
            self._ticker = self.loop.create_task(self._tick(), name="ditstream-txt2img-ticker")
        elif not txt:
            self._stop_ticker()

    def config_dict(self, cfg: StreamConfig, **extra: Any) -> dict[str, Any]:
        """A config as the ``ready`` and ``config`` messages show it (with ``fps``, and ``extra``)."""
        return {**cfg.to_dict(), "fps": self.fps, **extra}

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def _tick(self) -> None:
        """txt2img: offer an empty frame every 1/fps s on an absolute schedule (no drift), each with
        the next seq and its arrival stamped, as if a client had sent it."""
        assert self.handle is not None
        next_t = self.loop.time()
        while True:
            period = 1.0 / self.fps
            next_t += period
            now = self.loop.time()
            if next_t < now - period:  # fell far behind (a stall): restart the schedule
                next_t = now
            await asyncio.sleep(max(0.0, next_t - now))
            seq = self.arrivals.arrive(None, timing.clock())
            try:
                if self.handle.submit(None, seq, time.time() * 1e3):
                    self.metrics.frames.labels("dropped").inc()
            except ValidationError:  # mode switched under us; the next applied config stops us
                self.arrivals.depart(seq)
                continue
            except DitstreamError:  # the stream closed or the engine died: the output path tells
                return

    # ------------------------------------------------------------------------------ outputs
    def count_drops(self) -> None:
        """Outputs the engine's bounded queue dropped since last asked, into ``frames{dropped}``."""
        assert self.handle is not None
        dropped = self.handle.outputs.dropped
        if dropped > self._out_dropped:
            self.metrics.frames.labels("dropped").inc(dropped - self._out_dropped)
            self._out_dropped = dropped

    def failed(self, out: StreamOutput) -> dict[str, Any]:
        """A frame whose model call failed (counted), or that a worker refused (bad input, as the
        intake refuses it in process: not counted): the in-band error to send in its place."""
        self.arrivals.depart(out.seq)
        err = out.error if isinstance(out.error, DitstreamError) else GenerationError(str(out.error))
        if not isinstance(err, ValidationError):
            self.metrics.frames.labels("failed").inc()
        return {**ws_error(err), "seq": out.seq, "ts": out.ts}

    def leaving(self, out: StreamOutput, encode_s: float = 0.0) -> OutputTimings:
        """An output leaves the server now: its timings (glass-to-glass by ``timing``), counted."""
        received_at, decode_s = self.arrivals.depart(out.seq)
        server_s = timing.glass_to_glass(received_at, timing.clock(), out.timings.get("total", 0.0), encode_s)
        t = OutputTimings(decode_s=decode_s, queue_s=out.timings.get("queue", 0.0),
                          inference_s=out.timings.get("inference", 0.0), encode_s=encode_s, server_s=server_s)
        m = self.metrics
        m.frames.labels("skipped" if out.skipped else "processed").inc()
        m.queue_seconds.observe(t.queue_s)
        if not out.skipped:
            m.inference_seconds.observe(t.inference_s)
        m.e2e_seconds.observe(server_s)
        m.overhead_seconds.observe(max(0.0, server_s - t.inference_s))
        if self.outputs is not None:
            self.outputs.feed(out)
        return t

    def frame_dropped(self, seq: int | None = None) -> None:
        """An input frame was replaced before the engine took it: counted, never answered."""
        if seq is not None:
            self.arrivals.depart(seq)
        self.metrics.frames.labels("dropped").inc()


def _close_if_added(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
