"""``/v1/stream``: one live stream per WebSocket (protocol in ``docs/protocol.md``).

This module holds the session and its input half; ``session_out.py`` its output half (encoder and
sender).

Per connection: the receive loop parses control messages and frames; one codec job at a time per
stream decodes the received frames in order (at most two wait, as in the engine's inbox) and offers
them to the engine itself, so neither the frame nor its result wakes the event loop again (errors
do). The engine thread's ``notify`` starts a per-stream encoder in the codec pool that drains the bounded drop-oldest output
queue in order and wakes the event loop; one sender task is the only writer to the socket
(uvicorn's ``send`` can block on a slow client, so nothing else may wait on it). A frame thus
crosses threads only loop → codec → engine → codec → loop. In txt2img mode a ticker task offers
empty frames at the requested fps. Leaving for any reason closes the engine stream (its queued work is dropped),
cancels the tasks and gives back the admission permit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import (
    DitstreamError,
    EngineDeadError,
    OverloadedError,
    PayloadTooLargeError,
    ValidationError,
)
from ditstream.engine.imagefile import check_header
from ditstream.engine.types import StreamOutput
from ditstream.server import codec
from ditstream.server.api.auth import SUBPROTOCOL
from ditstream.server.api.state import AppState, state_of
from ditstream.server.engine_client import EngineStream
from ditstream.server.errors import (
    WS_INTERNAL_ERROR,
    WS_TRY_AGAIN_LATER,
    ProtocolAbuseError,
    mapping_for,
    ws_error,
)
from ditstream.server.live.protocol import (
    PROTOCOL_VERSION,
    ConfigMessage,
    PingMessage,
    frame_header_fields,
    parse_control,
    unpack_frame,
)
from ditstream.server.live.session_out import SessionOutputs
from ditstream.server.live.session_util import MAX_TRACKED_FRAMES, close_if_added, wanted_config
from fastapi import APIRouter, WebSocket

logger = logging.getLogger(__name__)

#: Frames a stream may hold undecoded: the engine inbox's depth (``FrameInbox``), so the decode step
#: drops nothing the engine would keep (a client with two frames in flight loses none).
DECODE_DEPTH = 2
router = APIRouter()



@router.websocket("/v1/stream", name="stream")
async def stream(websocket: WebSocket) -> None:
    """Admit (or refuse with 1013), then run a ``StreamSession`` until either side leaves."""
    state = state_of(websocket.app)
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in websocket.scope.get("subprotocols", ()) else None
    try:
        if state.shutting_down:
            raise OverloadedError("server is shutting down", retry_after=state.settings.retry_after_s,
                                  reason="shutting_down")
        state.require_engine()
        permit = state.admission.streams.acquire()
    except DitstreamError as exc:
        await websocket.accept(subprotocol=subprotocol)
        await websocket.send_text(json.dumps(ws_error(exc)))
        await websocket.close(mapping_for(exc).ws_close or WS_TRY_AGAIN_LATER, exc.error_type)
        return
    try:
        await websocket.accept(subprotocol=subprotocol)
        await StreamSession(websocket, state).run()
    finally:
        permit.release()


class StreamSession(SessionOutputs):
    """The state of one connection."""

    def __init__(self, websocket: WebSocket, state: AppState) -> None:
        self.ws = websocket
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self.runner = state.require_engine()
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.control_out: deque[str] = deque()
        self.handle: EngineStream | None = None
        self._relay: Any = None  # the handle's ``submit_encoded``, when it relays coded frames
        #: The latest config asked for (the engine's copy may lag by one control message).
        self.config: StreamConfig = StreamConfig()
        self.fps = self.settings.default_fps
        self.quality = self.settings.jpeg_quality
        self.next_seq = 0
        self.received: OrderedDict[int, float] = OrderedDict()  # seq -> receive time (perf_counter)
        self.close_code: int | None = None
        self.close_reason = ""
        self.errors_in_row = 0
        self.tasks: set[asyncio.Task] = set()
        self.ticker: asyncio.Task | None = None
        self._last_image: Any = None
        self._last_bytes = b""
        self._last_quality = -1
        self._out_dropped = 0
        #: seq -> decode seconds, written by codec threads (plain dict ops are atomic under the GIL).
        self.decode_s: dict[int, float] = {}
        #: Encoded outputs handed from the codec pool to the sender, in order; bounded like the
        #: engine's output queue, so a client that stops reading costs a fixed amount of memory.
        self.encoded: deque[tuple[StreamOutput, bytes | None, float]] = deque()
        self.encoded_limit = self.settings.output_queue_size
        self._encode_lock = threading.Lock()
        self._encode_scheduled = False
        self._encode_again = False
        #: Received frames not yet decoded, as deep as the engine's inbox (``DECODE_DEPTH``: a client
        #: with two frames in flight keeps both; a third drops the oldest), and whether a codec thread
        #: is draining them: frames are decoded one at a time per stream, in order.
        self._decode_lock = threading.Lock()
        self._decode_queue: deque[tuple[memoryview, int, float, tuple[int, int], float]] = deque()
        self._decode_scheduled = False
        self._ended = False

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        self.state.sessions.add(self)
        self.metrics.streams_active.inc()
        self.metrics.streams_by_transport.labels("websocket").inc()
        sender: asyncio.Task | None = None
        try:
            self.config = self.state.validate(StreamConfig(**self.state.stream_defaults()))
            adding = self.loop.run_in_executor(None, self.runner.add_stream, self.config, self._notify)
            try:
                self.handle = await asyncio.shield(adding)
            except asyncio.CancelledError:  # left while the engine was building the stream: undo it
                adding.add_done_callback(close_if_added)
                raise
            logger.debug("stream %s opened", self.handle.id)
            self._relay_setup()
            self.send_json({"type": "ready", "session": self.handle.id, "protocol": PROTOCOL_VERSION,
                            "config": self._config_dict(self.config), "limits": self._limits(),
                            "model": self.state.model_card()})
            sender = asyncio.create_task(self._sender(), name=f"ditstream-sender-{self.handle.id}")
            await self._receive_loop(sender)
        except DitstreamError as exc:  # could not even open the stream
            logger.warning("stream setup failed: %s", exc.message)
            with contextlib.suppress(Exception):
                await self.ws.send_text(json.dumps(ws_error(exc)))
                await self.ws.close(mapping_for(exc).ws_close or WS_INTERNAL_ERROR, exc.error_type)
        finally:
            await self._cleanup(sender)

    async def _cleanup(self, sender: asyncio.Task | None) -> None:
        for task in [*self.tasks, *([self.ticker] if self.ticker else [])]:
            task.cancel()
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        with self._decode_lock:
            self._decode_queue.clear()  # a frame not decoded yet is not worth decoding now
            self._ended = True
        if self.handle is not None:
            with contextlib.suppress(DitstreamError):
                self.handle.close()  # the engine drops its slot, pipeline and outputs
            logger.debug("stream %s closed (%s)", self.handle.id, self.handle.stats.as_dict())
        self.metrics.streams_active.dec()
        self.metrics.streams_by_transport.labels("websocket").dec()
        self.state.sessions.discard(self)

    def request_close(self, code: int, reason: str) -> None:
        """Ask the sender to flush pending messages and close the socket (from any coroutine)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.wake.set()





    # ------------------------------------------------------------------------------ receiving
    async def _receive_loop(self, sender: asyncio.Task) -> None:
        """Read until the client leaves or a close is requested; the sender does the closing."""
        reader = asyncio.create_task(self._read_messages(), name="ditstream-reader")
        done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
        if reader not in done:  # the sender closed the socket (engine death, shutdown, client gone)
            reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        if self.close_code is not None:  # we asked to close: let the sender flush the error and close
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(sender, timeout=2.0)

    async def _read_messages(self) -> None:
        while self.close_code is None:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            t_recv = time.perf_counter()
            try:
                if msg.get("bytes") is not None:
                    self._on_frame(msg["bytes"], t_recv)  # a frame counts as good once decoded
                else:
                    await self._on_text(msg.get("text") or "")
                    self.errors_in_row = 0
            except DitstreamError as exc:
                self._on_error(exc)
            except Exception:  # a bug, not bad input: loud in the log, and the client gets 1011, not silence
                logger.exception("unexpected error handling a %s message", "binary" if msg.get("bytes") else "text")
                self._on_error(DitstreamError("internal error while handling the message"))

    def _on_error(self, exc: DitstreamError) -> None:
        row = mapping_for(exc)
        self.send_json(ws_error(exc))
        if row.ws_close is not None:
            self.request_close(row.ws_close, exc.error_type)
            return
        self.errors_in_row += 1
        if self.errors_in_row >= self.settings.max_consecutive_errors:
            abuse = ProtocolAbuseError(f"{self.errors_in_row} bad messages in a row")
            self.send_json(ws_error(abuse))
            self.request_close(mapping_for(abuse).ws_close or 1003, abuse.error_type)

    def _on_frame(self, data: bytes, t_recv: float) -> None:
        if len(data) > self.settings.max_frame_bytes:
            raise PayloadTooLargeError(
                f"frame is {len(data)} bytes; the limit is {self.settings.max_frame_bytes}", field="frame")
        header, image_bytes = unpack_frame(data)
        seq, ts = frame_header_fields(header)
        if seq is None:
            seq = self.next_seq
        self.next_seq = max(self.next_seq, seq + 1)
        if ts is None:
            ts = time.time() * 1e3
        cfg = self.config
        self._track(seq, t_recv)
        if self._relay is not None:
            self._relay_frame(image_bytes, seq, ts, (cfg.width, cfg.height), t_recv)
            return
        with self._decode_lock:
            replaced = self._decode_queue.popleft() if len(self._decode_queue) >= DECODE_DEPTH else None
            self._decode_queue.append((image_bytes, seq, ts, (cfg.width, cfg.height), t_recv))
            start, self._decode_scheduled = not self._decode_scheduled, True
        if replaced is not None:  # not decoded yet and already superseded twice: dropped like a late frame
            self._untrack(replaced[1])
            self.metrics.frames.labels("dropped").inc()
        if start:
            self.state.codec.pool.submit(self._decode_pending)

    def _relay_frame(self, data: memoryview, seq: int, ts: float, size: tuple[int, int], t_recv: float) -> None:
        """Gateway: check the frame's header and hand the client's bytes to the handle, here on the loop.

        There is nothing to decode: the header check takes microseconds, less than the codec-pool
        hop (a submit, a thread wake-up, the GIL handed over and back) it replaces, and the handle's
        latest-wins slot drops a superseded frame as the decode slot would. A bad frame raises for
        the reader's error path, no longer tracked.
        """
        try:
            fmt, w, h = check_header(data, max_pixels=self.settings.max_pixels, size=size)
            self.decode_s[seq] = time.perf_counter() - t_recv
            dropped = self._relay(bytes(data), seq, ts, fmt, w, h)
        except DitstreamError:
            self._untrack(seq)
            raise
        if dropped:
            self.metrics.frames.labels("dropped").inc()
        self.errors_in_row = 0

    def _decode_pending(self) -> None:
        """Codec thread: decode the stream's newest frame and offer it to the engine directly.

        Neither the frame nor its result goes back through the event loop (no loop wake-up per
        frame); only an error does. At most one of these runs per stream, so frames stay in order.
        Must never raise: it runs in the codec pool.
        """
        while True:
            with self._decode_lock:
                job = self._decode_queue.popleft() if self._decode_queue else None
                if job is None:
                    self._decode_scheduled = False
                    return
            data, seq, ts, size, t_recv = job
            if self._ended:  # the client left while this frame waited: nothing to answer
                continue
            try:
                assert self.handle is not None
                image = codec.decode(data, max_pixels=self.settings.max_pixels, size=size, fast=True)
                self.decode_s[seq] = time.perf_counter() - t_recv
                dropped = self.handle.submit(image, seq, ts)
                if dropped:
                    self.metrics.frames.labels("dropped").inc()
                self.errors_in_row = 0
            except DitstreamError as exc:  # bad input; or the stream closed meanwhile (nobody to tell)
                if not self._ended:
                    self._call_loop(self._on_frame_error, seq, exc)
            except Exception:  # a bug, not bad input: loud in the log, and the client gets 1011
                logger.exception("unexpected error decoding a frame")
                self._call_loop(self._on_frame_error, seq, DitstreamError("internal error while handling the message"))

    def _relay_setup(self) -> None:
        """A stream that takes coded frames (gateway mode) gets the client's bytes as they are and
        hands back the workers' JPEG at the client's quality: no codec work here at all."""
        self._relay = getattr(self.handle, "submit_encoded", None)
        if self._relay is not None:
            self.handle.relay_encoded = True  # type: ignore[union-attr]
            self.handle.output_quality = self.quality  # type: ignore[union-attr]

    def _call_loop(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_frame_error(self, seq: int, exc: DitstreamError) -> None:
        self._untrack(seq)
        self._on_error(exc)

    def _untrack(self, seq: int) -> None:
        self.received.pop(seq, None)
        self.decode_s.pop(seq, None)

    def _track(self, seq: int, t_recv: float) -> None:
        self.received[seq] = t_recv
        while len(self.received) > MAX_TRACKED_FRAMES:
            old, _ = self.received.popitem(last=False)
            self.decode_s.pop(old, None)

    async def _on_text(self, text: str) -> None:
        if len(text.encode()) > self.settings.max_control_bytes:
            raise PayloadTooLargeError(f"control message is over {self.settings.max_control_bytes} bytes",
                                       field="message")
        msg = parse_control(text)
        if isinstance(msg, PingMessage):
            self.send_json({"type": "pong", "ts": msg.ts, "server_time": time.time() * 1e3})
        elif isinstance(msg, ConfigMessage):
            await self._on_config(msg)

    async def _on_config(self, msg: ConfigMessage) -> None:
        wanted = wanted_config(self.state, self.config, msg)  # names the field on error; nothing applied yet
        if msg.fps is not None:
            self.fps = msg.fps
        if msg.quality is not None:
            self.quality = msg.quality
            self._relay_setup()
        assert self.handle is not None
        changed = wanted != self.config
        reshapes = (wanted.width, wanted.height, wanted.mode) != (self.config.width, self.config.height,
                                                                  self.config.mode)
        self.config = wanted
        if not changed:
            self._applied(wanted)
            return
        # Pass every field, not only the changes: the engine's copy may not have applied the previous
        # message yet, and a diff against it would undo that message.
        future = asyncio.wrap_future(self.handle.reconfigure(**wanted.fields()))
        if reshapes:
            # Frames of the new size/mode must not reach the engine before it switched: wait (rare).
            self._applied(await future)
        else:
            task = asyncio.create_task(self._await_applied(future))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _await_applied(self, future: asyncio.Future) -> None:
        try:
            self._applied(await future)
        except DitstreamError as exc:
            self._on_error(exc)

    def _applied(self, cfg: StreamConfig) -> None:
        self.send_json({"type": "config", "applied": self._config_dict(cfg)})
        if cfg.mode == "txt2img" and self.ticker is None:
            self.ticker = asyncio.create_task(self._ticker(), name="ditstream-txt2img-ticker")
        elif cfg.mode != "txt2img" and self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None

    async def _ticker(self) -> None:
        """txt2img: offer an empty frame every 1/fps s on an absolute schedule (no drift)."""
        next_t = self.loop.time()
        while True:
            period = 1.0 / self.fps
            next_t += period
            now = self.loop.time()
            if next_t < now - period:  # fell far behind (a stall): restart the schedule
                next_t = now
            await asyncio.sleep(max(0.0, next_t - now))
            seq = self.next_seq
            self.next_seq += 1
            self._track(seq, time.perf_counter())
            assert self.handle is not None
            try:
                if self.handle.submit(None, seq, time.time() * 1e3):
                    self.metrics.frames.labels("dropped").inc()
            except ValidationError:  # mode switched under us; the next applied config stops us
                continue
            except EngineDeadError:
                return






