"""One WebRTC session: a WHIP publisher's peer, its engine stream, its WHEP viewers and control channels.

A session is a ``LiveSession`` like a WebSocket one (``session.py``: same admission permit, config
validation, txt2img ticker, output timing and close; batched with every other stream in the engine's
model calls); only the transport differs, and it is what this module holds. The publisher's video track feeds the stream (``webrtc_media.InputPump``); the engine's
``notify`` wakes the event loop, which hands the newest output image to every viewer's
``OutputTrack``. Config changes arrive over ``POST /v1/sessions/{id}/config`` or a data channel named
``control`` (on the publisher's or a viewer's peer) carrying the WebSocket's JSON control messages.

The session ends — engine stream closed, permit given back, viewers hung up — on ``DELETE``, when the
publisher's peer fails or closes (ICE failure, consent timeout, DTLS close), when it has not connected
within ``webrtc_connect_timeout_s``, at shutdown, or when the engine dies. Imported only when the
``webrtc`` extra is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import DitstreamError, EngineDeadError, OverloadedError, PayloadTooLargeError
from ditstream.server.api.admission import Permit
from ditstream.server.api.state import AppState
from ditstream.server.engine_client import EngineStream
from ditstream.server.errors import MalformedMessageError, ws_error
from ditstream.server.live.protocol import PROTOCOL_VERSION, ConfigMessage, PingMessage, parse_control
from ditstream.server.live.session import LiveSession
from ditstream.server.live.webrtc_dtls import watch_dtls
from ditstream.server.live.webrtc_ended import EndedSessions
from ditstream.server.live.webrtc_jitter import use_frame_end_marker
from ditstream.server.live.webrtc_media import InputPump, OutputTrack

logger = logging.getLogger(__name__)

CONTROL_LABEL = "control"


def new_peer(state: AppState) -> RTCPeerConnection:
    """A peer connection with the server's ICE servers (none by default: no STUN lookups)."""
    servers = [RTCIceServer(urls=u) for u in state.settings.webrtc_stun_servers]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


async def accept_offer(pc: RTCPeerConnection, sdp: str) -> None:
    """Apply a client's SDP offer; anything unusable is a 400 naming the problem."""
    if not sdp.lstrip().startswith("v=0"):
        raise MalformedMessageError("the body is not an SDP offer (it must start with 'v=0')", field="sdp")
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # aiortc raises ValueError, KeyError, ... for what it cannot use
        raise MalformedMessageError(f"the SDP offer cannot be used: {exc!r:.300}", field="sdp") from exc


async def answer(pc: RTCPeerConnection) -> str:
    """Create and apply the answer; aiortc gathers every ICE candidate first (no trickle needed)."""
    await pc.setLocalDescription(await pc.createAnswer())
    return pc.localDescription.sdp


class WebRTCSession:
    """One WHIP session's peers and channels around its ``LiveSession`` (see the module docstring)."""

    def __init__(self, state: AppState, permit: Permit) -> None:
        self.state = state
        self.settings = state.settings
        self.live = LiveSession(state, permit, "webrtc", self, notify=self._notify, on_mode=self._on_mode)
        self.loop = self.live.loop
        self.id = ""
        self.pc: RTCPeerConnection | None = None
        self.pump: InputPump | None = None
        self.viewers: dict[str, tuple[RTCPeerConnection, OutputTrack]] = {}
        self.channels: set[Any] = set()
        self.tasks: set[asyncio.Task] = set()
        self.connected = asyncio.Event()
        self.closed = False
        #: Why the publisher's peer failed ("DTLS failed: ..."), once known; the session ends with it.
        self.failure: str | None = None
        self._fan_scheduled = False
        self._last_image: np.ndarray | None = None

    @property
    def handle(self) -> EngineStream | None:
        return self.live.handle

    @property
    def config(self) -> StreamConfig:
        """The latest config asked for (the engine's copy may lag by one)."""
        return self.live.config

    # ------------------------------------------------------------------------------ lifecycle
    @classmethod
    async def publish(cls, state: AppState, permit: Permit, offer: str, msg: ConfigMessage) -> tuple[
            WebRTCSession, str]:
        """Open a session for a WHIP offer; returns it and the SDP answer. On failure nothing is left."""
        try:
            session = cls(state, permit)
        except BaseException:
            permit.release()
            raise
        try:
            return session, await session._open(offer, msg)
        except BaseException:
            await session.close("setup failed")
            raise

    async def _open(self, offer: str, msg: ConfigMessage) -> str:
        cfg = self.live.first_config(msg)  # refused (422) before anything is opened
        self.pc = pc = new_peer(self.state)
        tracks: list[Any] = []
        pc.on("track", lambda track: tracks.append(track) if track.kind == "video" else None)
        pc.on("datachannel", self._on_channel)
        pc.on("connectionstatechange", lambda: self._on_publisher_state(pc.connectionState))
        await accept_offer(pc, offer)
        watch_dtls(pc, self._on_dtls_failure)
        use_frame_end_marker(pc)  # a published frame reaches the decoder at its last packet
        if not tracks:
            raise MalformedMessageError("the SDP offer sends no video (WHIP needs an m=video section the "
                                        "client sends on)", field="sdp")
        handle = await self.live.open(cfg)
        self.id = handle.id
        self.state.webrtc[self.id] = self
        self.pump = InputPump(self.live, handle, self.state.codec.pool, self._on_error)
        for track in tracks:
            self._spawn(self.pump.run(track))
        self.live.applied(cfg)
        sdp = await answer(pc)
        self._spawn(self._connect_watchdog())
        logger.info("webrtc session %s opened", self.id)
        return sdp

    async def close(self, reason: str = "closed") -> None:
        """End the session (idempotent): viewers, publisher, then the live session (engine stream, permit)."""
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        if self.pump is not None:
            self.pump.stop()
        for viewer in list(self.viewers):
            await self.remove_viewer(viewer)
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await self.pc.close()
        self.live.close()
        reason = self.failure or reason
        if self.state.webrtc.pop(self.id, None) is not None:
            EndedSessions.of(self.state).record(self.id, reason)
            logger.info("webrtc session %s closed (%s)", self.id, reason)

    def request_close(self, code: int, reason: str) -> None:
        """Shutdown (``app._drain_sessions``): end the session from any coroutine. Its control
        channels are told first, ``{"type":"closing","code":1012,...}``, as a WebSocket gets its close
        code: the client then publishes again (to another server, through its load balancer)."""
        self.send_control({"type": "closing", "code": code, "reason": reason})
        self._spawn(self.close(reason), keep=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any], keep: bool = False) -> asyncio.Task:
        task = self.loop.create_task(coro)
        if not keep:  # kept ones (a close) are not cancelled by close itself
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            _KEEP.add(task)
            task.add_done_callback(_KEEP.discard)
        return task

    def _on_publisher_state(self, state: str) -> None:
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed") and not self.closed:
            self._spawn(self.close(f"publisher {state}"), keep=True)

    def status(self) -> dict[str, Any]:
        """``GET /v1/whip/{id}``: the publisher's connection state and why it failed, if it did."""
        state = self.pc.connectionState if self.pc is not None else "new"
        return {"session": self.id, "state": state, "viewers": len(self.viewers), "failure": self.failure}

    def _on_dtls_failure(self, reason: str) -> None:
        """The publisher's DTLS handshake failed: say why (log, metric, the session's end reason)."""
        if self.failure is not None:
            return
        self.failure = f"DTLS failed: {reason}"
        cause = "certificate_curve" if "certificate uses ECDSA" in reason else "handshake"
        self.state.metrics.webrtc_dtls_failures.labels(cause).inc()
        logger.warning("webrtc session %s: publisher's %s", self.id or "(opening)", self.failure)
        if not self.closed:
            self._spawn(self.close(self.failure), keep=True)

    async def _connect_watchdog(self) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), self.settings.webrtc_connect_timeout_s)
        except asyncio.TimeoutError:
            self._spawn(self.close("publisher never connected"), keep=True)

    # ------------------------------------------------------------------------------ viewers (WHEP)
    async def add_viewer(self, offer: str) -> tuple[str, str]:
        """A WHEP viewer: returns its id and the SDP answer sending this session's outputs."""
        if len(self.viewers) >= self.settings.webrtc_max_viewers:
            raise OverloadedError(f"session {self.id} has {len(self.viewers)} viewers, the limit",
                                  retry_after=self.settings.retry_after_s, reason="viewers")
        pc, track = new_peer(self.state), OutputTrack()
        viewer = secrets.token_hex(8)
        try:
            await accept_offer(pc, offer)
            if not any(t.kind == "video" for t in pc.getTransceivers()):
                raise MalformedMessageError("the SDP offer has no video section to play into (WHEP needs "
                                            "a recvonly m=video)", field="sdp")
            pc.addTrack(track)
            pc.on("datachannel", self._on_channel)
            pc.on("connectionstatechange", lambda: self._on_viewer_state(viewer, pc.connectionState))
            sdp = await answer(pc)
        except BaseException:
            track.stop()
            await pc.close()
            raise
        self.viewers[viewer] = (pc, track)
        self.state.metrics.webrtc_viewers.inc()
        if self._last_image is not None:
            track.put(self._last_image)
        return viewer, sdp

    async def remove_viewer(self, viewer: str) -> bool:
        entry = self.viewers.pop(viewer, None)
        if entry is None:
            return False
        self.state.metrics.webrtc_viewers.dec()
        pc, track = entry
        track.stop()
        with contextlib.suppress(Exception):
            await pc.close()
        return True

    def _on_viewer_state(self, viewer: str, state: str) -> None:
        if state in ("failed", "closed"):
            self._spawn(self.remove_viewer(viewer))

    # ------------------------------------------------------------------------------ outputs
    def _notify(self) -> None:
        """Engine thread, after each output: wake the loop once to fan the outputs out."""
        if self._fan_scheduled:
            return
        self._fan_scheduled = True
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self.loop.call_soon_threadsafe(self._fan_out)

    def _fan_out(self) -> None:
        """On the loop: each output leaves now, for every viewer (the newest image); failures in-band."""
        self._fan_scheduled = False
        handle = self.handle
        if handle is None or self.closed:
            return
        latest = None
        for out in handle.outputs.drain():
            if out.error is not None:
                self.send_control(self.live.failed(out))
                continue
            self.live.leaving(out)
            latest = out.image
        self.live.count_drops()
        if latest is not None:
            self._last_image = latest
            for _, track in self.viewers.values():
                track.put(latest)
        if handle.outputs.closed and not self.live.runner.alive:
            self._spawn(self.close("the engine stopped"), keep=True)

    def _on_error(self, exc: DitstreamError) -> None:
        self.send_control(ws_error(exc))
        if isinstance(exc, EngineDeadError):
            self._spawn(self.close("the engine stopped"), keep=True)

    # ------------------------------------------------------------------------------ control
    def config_dict(self, cfg: StreamConfig) -> dict[str, Any]:
        return self.live.config_dict(cfg)

    async def apply_config(self, msg: ConfigMessage) -> StreamConfig:
        """Validate (errors name the field, nothing applied), apply, and return the applied config."""
        change = self.live.change(msg)
        applied = await change.applied if change.applied is not None else change.config
        self.live.applied(applied)
        return applied

    def _on_mode(self, txt2img: bool) -> None:
        """txt2img: the session's ticker feeds empty frames and the published video is ignored."""
        if self.pump is not None:
            self.pump.paused = txt2img

    def _on_channel(self, channel: Any) -> None:
        if channel.label != CONTROL_LABEL:
            return
        self.channels.add(channel)
        channel.on("close", lambda: self.channels.discard(channel))
        channel.on("message", lambda message: self._spawn(self._on_control(channel, message)))
        self._send(channel, {"type": "ready", "session": self.id, "protocol": PROTOCOL_VERSION,
                             "config": self.config_dict(self.config), "model": self.state.model_card()})

    async def _on_control(self, channel: Any, message: str | bytes) -> None:
        try:
            if not isinstance(message, str):
                raise MalformedMessageError("control messages are JSON text, not binary", field="message")
            if len(message.encode()) > self.settings.max_control_bytes:
                raise PayloadTooLargeError(f"control message is over {self.settings.max_control_bytes} bytes",
                                           field="message")
            msg = parse_control(message)
            if isinstance(msg, PingMessage):
                self._send(channel, {"type": "pong", "ts": msg.ts, "server_time": time.time() * 1e3})
            elif isinstance(msg, ConfigMessage):
                applied = await self.apply_config(msg)
                self._send(channel, {"type": "config", "applied": self.config_dict(applied)})
        except DitstreamError as exc:
            self._send(channel, ws_error(exc))

    def send_control(self, message: dict[str, Any]) -> None:
        for channel in list(self.channels):
            self._send(channel, message)

    @staticmethod
    def _send(channel: Any, message: dict[str, Any]) -> None:
        if channel.readyState == "open":
            channel.send(json.dumps(message, separators=(",", ":")))


#: Close tasks in flight (the loop keeps only weak references to tasks).
_KEEP: set[asyncio.Task] = set()
