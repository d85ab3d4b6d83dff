"""Live sessions through the gateway: pinning a stream to a worker, its controls and its close.

The session table and the pending controls (opens and reconfigures waiting for a worker's reply)
are this object's own, under its lock. Moving a session (re-pin, rebalance) is the supervisor's
decision (``gateway_supervisor.py``); it calls ``pin`` here.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.errors import OverloadedError, ValidationError
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.gateway_publisher import Outbox, xadd_frame
from ditstream.server.scale.gateway_stream import GatewayStreamHandle
from ditstream.server.scale.messages import (
    SESSION_TTL_S,
    SessionControl,
    SessionRecord,
    SessionReply,
    config_from_wire,
    config_to_wire,
)

if TYPE_CHECKING:
    import redis
    from ditstream.server.scale.gateway_supervisor import Fleet

logger = logging.getLogger(__name__)


class GatewaySessions:
    """This gateway's live sessions: open (pin), control, close; the handles' side of the gateway."""

    def __init__(self, r: redis.Redis, cfg: ScaleConfig, gateway_id: str, replies: str, engine_config: EngineConfig,
                 outbox: Outbox, fleet: Fleet, counters: Counters, *, open_timeout_s: float,
                 validate: Callable[[StreamConfig], StreamConfig], running: Callable[[], bool]) -> None:
        self.r = r
        self.cfg = cfg
        self.keys = cfg.keys
        self.id = gateway_id
        self.replies = replies
        self.engine_config = engine_config
        self.outbox = outbox
        self.fleet = fleet
        self.counters = counters
        self.open_timeout_s = open_timeout_s
        #: The gateway's checks of a config (``RedisGatewayRunner.validate``), run on every reconfigure.
        self.validate = validate
        #: Whether the gateway runs: a handle refuses frames once it stopped.
        self.running = running
        self._lock = threading.Lock()
        self._sessions: dict[str, GatewayStreamHandle] = {}
        self._controls: dict[str, tuple[Future, str]] = {}  # request -> (future, session)

    # ------------------------------------------------------------------------------ the table
    def handles(self) -> list[GatewayStreamHandle]:
        with self._lock:
            return list(self._sessions.values())

    def count(self) -> int:
        return len(self._sessions)

    def add(self, handle: GatewayStreamHandle) -> None:
        with self._lock:
            self._sessions[handle.id] = handle

    def loads(self) -> dict[str, int]:
        """Sessions per live worker: its heartbeat's count (every gateway's sessions, one beat old) or
        this gateway's own count, whichever is higher (ours is current)."""
        with self._lock:
            mine: dict[str, int] = {}
            for h in self._sessions.values():
                mine[h.worker] = mine.get(h.worker, 0) + 1
        return {wid: max(hb.sessions, mine.get(wid, 0)) for wid, hb in self.fleet.workers.items() if hb.engine_alive}

    def _pick_worker(self, exclude: set[str]) -> str | None:
        loads = self.loads()
        workers = self.fleet.workers
        live = [workers[wid] for wid in loads if wid not in exclude and wid in workers]
        if not live:
            return None
        return min(live, key=lambda hb: (loads[hb.worker], hb.jobs_inflight)).worker

    # ------------------------------------------------------------------------------ open
    def add_stream(self, cfg: StreamConfig, notify: Callable[[], None] | None = None,
                   timeout: float | None = 60.0) -> GatewayStreamHandle:
        """Pin a new (validated) session to the least busy live worker (blocking: off the event loop)."""
        handle = GatewayStreamHandle(self, f"s-{uuid.uuid4().hex[:16]}", cfg, notify)
        self.add(handle)
        self.outbox.put("wake-reader", None)  # the reader adds the new output stream to its XREAD
        deadline = time.monotonic() + (timeout or self.open_timeout_s)
        tried: set[str] = set()
        handle.pinning = True
        try:
            while True:
                if self.pin(handle, exclude=tried):
                    return handle
                tried.add(handle.worker)
                if time.monotonic() > deadline or not (set(self.fleet.workers) - tried):
                    raise OverloadedError("no worker could open the stream", reason="no_worker")
        except BaseException:
            self.close_session(handle)  # also tells a worker that opened it late, and drops the record
            raise
        finally:
            handle.pinning = False

    def pin(self, handle: GatewayStreamHandle, exclude: set[str], prefer: str | None = None) -> bool:
        """Open ``handle`` on a live worker (``prefer`` when it is live) and record where; raises the
        worker's validation errors."""
        live = self.fleet.workers.get(prefer or "")
        wid = prefer if live is not None and live.engine_alive else self._pick_worker(exclude)
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
        handle.applied(applied)
        self.counters.add("sessions_pinned")
        logger.info("session %s pinned to %s (epoch %d)", handle.id, wid, handle.epoch)
        return True

    def resend_unanswered(self, h: GatewayStreamHandle) -> None:
        """After a re-pin: the frames sent to the old worker and not answered go to the new one (oldest
        first, under the new epoch), unless the client has sent a newer frame since."""
        if h.slot:
            return
        pipe = self.r.pipeline(transaction=False)
        items = [it for it in list(h.sent) if it[0] > h.last_seq_out]
        for seq, ts, meta, data in items:
            xadd_frame(pipe, self.keys, self.cfg, h, seq, ts, meta, data)
        if items:
            pipe.execute()
            self.counters.add("frames_resent", len(items))

    def forget_record(self, h: GatewayStreamHandle) -> None:
        """Drop ``h``'s record (a failed re-open wrote it): the supervisor's next pass re-opens it."""
        self.r.delete(self.keys.session(h.id))

    def refresh_record(self, h: GatewayStreamHandle, now: float) -> None:
        self.r.expire(self.keys.session(h.id), SESSION_TTL_S)
        h.refreshed = now

    # ------------------------------------------------------------------------------ controls
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
            self.outbox.put("control", (handle.worker, msg))
        return fut

    def on_session_reply(self, rep: SessionReply) -> None:
        """A worker's answer to an open or reconfigure (reader thread)."""
        with self._lock:
            entry = self._controls.pop(rep.request, None)
        if entry is None or entry[0].done():
            return
        if rep.error is not None:
            entry[0].set_exception(rep.error.to_exception())
        else:
            entry[0].set_result(config_from_wire(rep.config or {}))

    def resolve_controls(self, handle: GatewayStreamHandle) -> None:
        """A re-pinned session was opened with its newest config: settle its pending reconfigures."""
        with self._lock:
            mine = [r for r, (_f, sid) in self._controls.items() if sid == handle.id]
            futures = [self._controls.pop(r)[0] for r in mine]
        for f in futures:
            if not f.done():
                f.set_result(handle.config)

    # ------------------------------------------------------------------------------ close
    def close_session(self, handle: GatewayStreamHandle) -> None:
        """Forget the session here and tell its worker; never blocks (safe on the event loop)."""
        if handle.closed:
            return
        handle.closed = True
        with self._lock:
            self._sessions.pop(handle.id, None)
        handle.outputs.close()
        self.outbox.put("close", (handle.worker, handle.id, handle.epoch))

    def close_all(self) -> None:
        for handle in self.handles():
            self.close_session(handle)
