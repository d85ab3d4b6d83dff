"""``/v1/stream``: one live stream per WebSocket (protocol in ``docs/protocol.md``) — the transport only.

The stream's life (admission, engine stream, config, txt2img ticker, output timing, close) is a
``LiveSession`` (``session.py``); here its wire: the receive loop parses control messages and
frames (frames go to ``FrameIntake``, ``ws_intake.py``: decoded in the codec pool or relayed), the
engine's outputs are coded by ``OutputEncoder`` (``ws_output.py``), and one sender task is the only
writer to the socket (uvicorn's ``send`` can block on a slow client, so nothing else may wait on
it). A frame thus crosses threads only loop → codec → engine → codec → loop. Leaving for any reason
closes the session: its engine stream (queued work dropped), tasks and admission permit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

from ditstream.engine.errors import DitstreamError, EngineDeadError, PayloadTooLargeError
from ditstream.engine.types import StreamOutput
from ditstream.server import codec
from ditstream.server.api.admission import Permit
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
from ditstream.server.live import timing
from ditstream.server.live.protocol import (
    PROTOCOL_VERSION,
    ConfigMessage,
    PingMessage,
    pack_frame,
    parse_control,
)
from ditstream.server.live.session import LiveSession, admit
from ditstream.server.live.ws_intake import FrameIntake
from ditstream.server.live.ws_output import OutputEncoder
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

logger = logging.getLogger(__name__)
router = APIRouter()

#: Control replies waiting for the sender; a client that never reads them is cut off.
MAX_PENDING_CONTROL = 256


@router.websocket("/v1/stream", name="stream")
async def stream(websocket: WebSocket) -> None:
    """Admit (or refuse with 1013), then run a ``WebSocketStream`` until either side leaves."""
    state = state_of(websocket.app)
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in websocket.scope.get("subprotocols", ()) else None
    try:
        permit = admit(state)
    except DitstreamError as exc:
        await websocket.accept(subprotocol=subprotocol)
        await websocket.send_text(json.dumps(ws_error(exc)))
        await websocket.close(mapping_for(exc).ws_close or WS_TRY_AGAIN_LATER, exc.error_type)
        return
    try:
        await websocket.accept(subprotocol=subprotocol)
        await WebSocketStream(websocket, state, permit).run()
    finally:
        permit.release()  # the session gave it back already, unless it never started


class WebSocketStream:
    """One connection: its messages in and out of its ``LiveSession``."""

    def __init__(self, websocket: WebSocket, state: AppState, permit: Permit) -> None:
        self.ws = websocket
        self.state = state
        self.settings = state.settings
        self.wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.control_out: deque[str] = deque()
        self.close_code: int | None = None
        self.close_reason = ""
        self.errors_in_row = 0
        self.tasks: set[asyncio.Task] = set()
        self.live = LiveSession(state, permit, "websocket", self, notify=self._notify)
        self.encoder = OutputEncoder(self.live, state.codec.pool, self.settings.jpeg_quality, self._wake_loop)
        self.intake: FrameIntake | None = None

    @property
    def handle(self) -> EngineStream | None:
        return self.live.handle

    def _notify(self) -> None:
        self.encoder.notify()

    def _wake_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self.loop.call_soon_threadsafe(self.wake.set)

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        sender: asyncio.Task | None = None
        try:
            handle = await self.live.open(self.live.first_config())
            handle.code_outputs(self.encoder.quality)
            self.intake = FrameIntake(self.live, handle, self.state.codec.pool, self._on_frame_error,
                                      self._frame_good)
            self.send_json({"type": "ready", "session": handle.id, "protocol": PROTOCOL_VERSION,
                            "config": self._config_dict(self.live.config), "limits": self._limits(),
                            "model": self.state.model_card()})
            sender = asyncio.create_task(self._sender(), name=f"ditstream-sender-{handle.id}")
            await self._receive_loop(sender)
        except DitstreamError as exc:  # could not even open the stream
            logger.warning("stream setup failed: %s", exc.message)
            with contextlib.suppress(Exception):
                await self.ws.send_text(json.dumps(ws_error(exc)))
                await self.ws.close(mapping_for(exc).ws_close or WS_INTERNAL_ERROR, exc.error_type)
        finally:
            await self._cleanup(sender)

    async def _cleanup(self, sender: asyncio.Task | None) -> None:
        for task in self.tasks:
            task.cancel()
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        if self.intake is not None:
            self.intake.end()
        self.live.close()

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
        assert self.intake is not None
        while self.close_code is None:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            t_recv = timing.clock()
            try:
                if msg.get("bytes") is not None:
                    self.intake.frame(msg["bytes"], t_recv)  # a frame counts as good once decoded
                else:
                    await self._on_text(msg.get("text") or "")
                    self.errors_in_row = 0
            except DitstreamError as exc:
                self._on_error(exc)
            except Exception:  # a bug, not bad input: loud in the log, and the client gets 1011, not silence
                logger.exception("unexpected error handling a %s message", "binary" if msg.get("bytes") else "text")
                self._on_error(DitstreamError("internal error while handling the message"))

    def _on_error(self, exc: DitstreamError, frame: dict[str, Any] | None = None) -> None:
        """Send ``exc`` in band (naming the ``frame``'s seq and ts when it answers one), then close on
        abuse."""
        row = mapping_for(exc)
        self.send_json({**ws_error(exc), **(frame or {})})
        if row.ws_close is not None:
            self.request_close(row.ws_close, exc.error_type)
            return
        self.errors_in_row += 1
        if self.errors_in_row >= self.settings.max_consecutive_errors:
            abuse = ProtocolAbuseError(f"{self.errors_in_row} bad messages in a row")
            self.send_json(ws_error(abuse))
            self.request_close(mapping_for(abuse).ws_close or 1003, abuse.error_type)

    def _on_frame_error(self, seq: int, ts: float, exc: DitstreamError) -> None:
        """On the loop: a frame the codec thread could not hand to the engine. The error names the
        frame as a failed model call's does; behind a gateway the worker's decoder refuses it, and
        the same message comes back in its place (``LiveSession.failed``)."""
        self.live.arrivals.depart(seq)
        self._on_error(exc, {"seq": seq, "ts": ts})

    def _frame_good(self) -> None:
        self.errors_in_row = 0

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
        change = self.live.change(msg)  # names the field on error; nothing applied yet
        if msg.quality is not None:
            self.encoder.quality = msg.quality
            assert self.handle is not None
            self.handle.code_outputs(msg.quality)
        if change.applied is None:
            self._applied(change.config)
        elif change.reshapes:  # frames of the new size/mode must not reach the engine before it switched
            self._applied(await change.applied)
        else:
            task = asyncio.create_task(self._await_applied(change.applied))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _await_applied(self, future: asyncio.Future) -> None:
        try:
            self._applied(await future)
        except DitstreamError as exc:
            self._on_error(exc)

    def _applied(self, cfg: Any) -> None:
        self.live.applied(cfg)
        self.send_json({"type": "config", "applied": self._config_dict(cfg)})

    # ------------------------------------------------------------------------------ sending
    def send_json(self, message: dict[str, Any]) -> None:
        if len(self.control_out) >= MAX_PENDING_CONTROL:
            self.request_close(1008, "client does not read")
            return
        self.control_out.append(json.dumps(message, separators=(",", ":")))
        self.wake.set()

    async def _sender(self) -> None:
        """The only writer to the socket: control replies, then output frames, then a close."""
        try:
            await self._send_loop()
        except (WebSocketDisconnect, ClientDisconnected, RuntimeError) as exc:  # the client left mid-send
            logger.debug("sender stopped: %r", exc)

    async def _send_loop(self) -> None:
        assert self.handle is not None
        outputs, encoded, runner = self.handle.outputs, self.encoder.encoded, self.live.runner
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.control_out:
                await self.ws.send_text(self.control_out.popleft())
            if self.close_code is not None:
                await self._close()
                return
            self.live.count_drops()
            while encoded:
                await self._send_output(*encoded.popleft())
            if outputs.closed and not outputs and not encoded and not self.encoder.scheduled:
                err = runner.error
                if err is not None or not runner.alive:
                    dead = EngineDeadError(f"the engine stopped: {err!r}" if err else "the engine stopped")
                    await self.ws.send_text(json.dumps(ws_error(dead)))
                    self.close_code, self.close_reason = WS_INTERNAL_ERROR, dead.error_type
                    await self._close()
                    return

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(self.close_code or 1000, self.close_reason[:120])

    async def _send_output(self, out: StreamOutput, data: bytes | None, encode_s: float) -> None:
        if data is None:  # its model call failed: in-band error naming the frame; the stream goes on
            await self.ws.send_text(json.dumps(self.live.failed(out), separators=(",", ":")))
            return
        timings = self.live.leaving(out, encode_s)
        header = {"seq": out.seq, "ts": out.ts, "skipped": out.skipped,
                  "width": out.encoded.width if out.encoded else int(out.image.shape[1]),
                  "height": out.encoded.height if out.encoded else int(out.image.shape[0]),
                  "timings": timings.as_ms()}
        await self.ws.send_bytes(pack_frame(header, data))

    def _config_dict(self, cfg: Any) -> dict[str, Any]:
        return self.live.config_dict(cfg, quality=self.encoder.quality)

    def _limits(self) -> dict[str, Any]:
        s, runner = self.settings, self.live.runner
        return {"max_frame_bytes": s.max_frame_bytes, "max_control_bytes": s.max_control_bytes,
                "max_pixels": s.max_pixels, "max_prompt_chars": s.max_prompt_chars,
                "size_multiple": runner.info.get("size_multiple"), "max_fps": s.max_fps,
                "steps": [1, 4], "output_queue": runner.engine_config.output_queue_size,
                "input_formats": list(codec.FORMATS), "output_format": "jpeg"}
