"""Live sessions through the gateway: pinning a stream to a worker, its controls and its outputs;
a mixin of ``RedisGatewayRunner``."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import (
    OverloadedError,
    ValidationError,
)
from ditstream.engine.imagefile import check_header
from ditstream.engine.types import EncodedImage, StreamOutput
from ditstream.server.scale.config import (
    fields_get,
)
from ditstream.server.scale.gateway_stream import SESSION_TTL_S, GatewayStreamHandle
from ditstream.server.scale.messages import (
    OutputHeader,
    SessionControl,
    SessionRecord,
    SessionReply,
    WireError,
    config_from_wire,
    config_to_wire,
    decode_image,
)

logger = logging.getLogger(__name__)


class GatewaySessions:
    """Session half of ``RedisGatewayRunner`` (which holds the state): open, pin, control, close, outputs."""

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

    def _loads(self) -> dict[str, int]:
        """Sessions per live worker: its heartbeat's count (every gateway's sessions, one beat old) or
        this gateway's own count, whichever is higher (ours is current)."""
        with self._lock:
            mine: dict[str, int] = {}
            for h in self._sessions.values():
                mine[h.worker] = mine.get(h.worker, 0) + 1
        return {wid: max(hb.sessions, mine.get(wid, 0)) for wid, hb in self.workers.items() if hb.engine_alive}

    def _pick_worker(self, exclude: set[str]) -> str | None:
        loads = self._loads()
        live = [self.workers[wid] for wid in loads if wid not in exclude]
        if not live:
            return None
        return min(live, key=lambda hb: (loads[hb.worker], hb.jobs_inflight)).worker

    def _rebalance(self) -> None:
        """Move one of this gateway's sessions from the busiest live worker to the idlest while they
        differ by two or more sessions: a worker that returns (or joins) takes its share instead of
        idling while the survivors carry every stream. The move is the re-pin's clean handover: a
        new epoch, the old worker closes the session at its first frame of that epoch, unanswered
        frames are re-sent and the client sees each frame once, in order. One move per
        ``rebalance_s``, so heartbeat counts catch up before the next decision."""
        self._rebalance_after = time.monotonic() + self.cfg.rebalance_s
        loads = self._loads()
        if len(loads) < 2:
            return
        busiest = max(loads, key=lambda w: loads[w])
        idlest = min(loads, key=lambda w: loads[w])
        if loads[busiest] - loads[idlest] < 2:
            return
        with self._lock:
            h = next((h for h in self._sessions.values()
                      if h.worker == busiest and not h.pinning and not h.closed), None)
        if h is None:
            return  # the busiest worker's sessions are other gateways'; they rebalance their own
        logger.info("gateway %s: moving session %s from %s (%d sessions) to %s (%d)", self.id, h.id, busiest,
                    loads[busiest], idlest, loads[idlest])
        h.pinning = True
        try:
            moved = self._pin(h, exclude=set(), prefer=idlest)
        except ValidationError as exc:
            logger.error("session %s cannot be moved: %s", h.id, exc.message)
            moved = False
        finally:
            h.pinning = False
        self._settle_move(h, moved, "sessions_rebalanced")

    def _pin(self, handle: GatewayStreamHandle, exclude: set[str], prefer: str | None = None) -> bool:
        """Open ``handle`` on a live worker (``prefer`` when it is live) and record where; raises the
        worker's validation errors."""
        live = self.workers.get(prefer or "")
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
        if (head.epoch != handle.epoch or (head.worker and head.worker != handle.worker)
                or head.seq <= handle.last_seq_out):
            # From a worker the session moved away from, or a frame already answered: outputs leave in
            # seq order, so a seq at or below the last delivered one is a repeat — e.g. a frame re-sent
            # after a Redis restart and answered again by the same worker under the same epoch.
            self.counters["outputs_stale"] += 1
            return
        handle.last_epoch_out, handle.last_seq_out = head.epoch, head.seq
        error = head.error.to_exception() if head.error is not None else None
        image = encoded = None
        if error is not None:  # the worker's model call failed: relayed as the in-band error for this seq
            handle.stats.failed += 1
        else:
            if head.image is None:
                raise WireError(f"output {head.seq} has neither an image nor an error")
            data = fields_get(fields, "img") or b""
            if handle.relay_encoded and head.image.codec == "jpeg":  # checked, never decoded: relayed
                m = head.image
                check_header(data, max_pixels=self.engine_config.max_pixels, size=(m.width, m.height))
                encoded = EncodedImage(data, m.width, m.height, m.quality)
            else:
                image = decode_image(head.image, data, max_pixels=self.engine_config.max_pixels)
            if head.skipped:
                handle.stats.skipped += 1
            else:
                handle.stats.processed += 1
        before = handle.outputs.dropped
        handle.outputs.put(StreamOutput(stream_id=handle.id, seq=head.seq, ts=head.ts, image=image,
                                        skipped=head.skipped, timings=dict(head.timings), error=error,
                                        encoded=encoded))
        handle.stats.dropped_outputs += handle.outputs.dropped - before
        self.counters["frames_received"] += 1

