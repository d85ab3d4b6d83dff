"""The gateway's three threads (publisher, reader, supervisor), a mixin of ``RedisGatewayRunner``.

They are the only code of the gateway that talks to Redis; see ``gateway.py`` for what each does."""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ditstream.engine.errors import (
    GenerationError,
    OverloadedError,
    ValidationError,
)
from ditstream.server.scale.config import (
    Backoff,
    ensure_group,
    fields_get,
    sid_str,
)
from ditstream.server.scale.gateway_stream import SESSION_TTL_S, GatewayStreamHandle
from ditstream.server.scale.messages import (
    FrameHeader,
    Heartbeat,
    JobResult,
    SessionControl,
    encode_image,
    load_reply,
)

logger = logging.getLogger(__name__)


class GatewayThreads:
    """Publisher, reader and supervisor loops of ``RedisGatewayRunner`` (which holds their state)."""

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
        if self._outbox.empty():  # the common case, once per frame: no pipeline built for nothing
            return
        pipe = self.r.pipeline(transaction=False)
        # First: our liveness key exists before any job of ours is in the stream (after a Redis
        # restart, too), so no worker takes a job of ours for an orphan. Sent only with items.
        pipe.set(self.keys.gateway(self.id), b"1", px=int(self.cfg.gateway_ttl_s * 1e3))
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
                pipe.expire(self.replies, self.cfg.replies_ttl_s)
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
        pipe = None
        n = 0
        for h in handles:
            item = h.slot.take()
            if item is None or not h.worker:
                continue
            if pipe is None:  # built only when a frame is there (the loop also wakes for outbox items)
                pipe = self.r.pipeline(transaction=False)
            image, seq, ts, coded = item
            if coded is not None:  # the client's bytes, relayed as they are
                meta, data = coded
            elif image is not None:
                meta, data = encode_image(image, self.cfg.frame_codec, self.cfg.jpeg_quality)
            else:
                meta, data = None, b""
            h.sent.append((seq, ts, meta, data))
            self._xadd_frame(pipe, h, seq, ts, meta, data)
            n += 1
        if pipe is not None:
            pipe.execute()
            self.counters["frames_sent"] += n

    def _xadd_frame(self, pipe: Any, h: GatewayStreamHandle, seq: int, ts: float, meta: Any, data: bytes) -> None:
        head = FrameHeader(seq=seq, ts=ts, image=meta, epoch=h.epoch, quality=h.output_quality)
        pipe.xadd(self.keys.frames_in(h.id), {"m": head.dump(), "img": data},
                  maxlen=self.cfg.frames_in_len, approximate=False)
        pipe.expire(self.keys.frames_in(h.id), SESSION_TTL_S)

    def _resend_unanswered(self, h: GatewayStreamHandle) -> None:
        """After a re-pin: the frames sent to the old worker and not answered go to the new one (oldest
        first, under the new epoch), unless the client has sent a newer frame since."""
        if h.slot:
            return
        pipe = self.r.pipeline(transaction=False)
        items = [it for it in list(h.sent) if it[0] > h.last_seq_out]
        for seq, ts, meta, data in items:
            self._xadd_frame(pipe, h, seq, ts, meta, data)
        if items:
            pipe.execute()
            self.counters["frames_resent"] += len(items)

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
            read: dict[str, list[str]] = {}
            for key, entries in resp or ():
                name = sid_str(key)
                for entry_id, fields in entries:
                    eid = sid_str(entry_id)
                    try:
                        if name == self.replies:
                            read.setdefault(name, []).append(eid)
                            last_reply = eid
                            self._on_reply(fields)
                        elif name in handles:
                            handles[name].last_out = eid
                            self._on_output(handles[name], fields)
                    except Exception as exc:
                        logger.error("gateway %s: unreadable entry %s on %s: %s", self.id, eid, name, exc)
            if read:
                self._delete_read(read)

    def _delete_read(self, read: dict[str, list[str]]) -> None:
        """A reply (a raw result, up to megabytes) is deleted once read: the reply stream holds only what
        is unread. Outputs are not: a session's output stream is capped at ``frames_out_len`` coded
        frames by the worker's XADD and expires with the session, and an XDEL per frame cost the
        gateway ~0.1 ms of CPU per frame (``bench gateway``, docs/benchmarks.md)."""
        pipe = self.r.pipeline(transaction=False)
        for name, ids in read.items():
            pipe.xdel(name, *ids)
        try:
            pipe.execute()
        except self._conn_errors():
            pass  # Redis went away: it took the entries with it

    def _on_reply(self, fields: dict[Any, Any]) -> None:
        raw = fields_get(fields, "m") or b"{}"
        if raw == b"{}":
            return
        reply = load_reply(raw)  # typed by its ``kind`` field
        if isinstance(reply, JobResult):
            self._on_result(reply, fields_get(fields, "img") or b"")
        else:
            self._on_session_reply(reply)

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
        self.r.set(self.keys.gateway(self.id), b"1", px=int(self.cfg.gateway_ttl_s * 1e3))
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        if restarted:  # every heartbeat vanished with the data: wait a TTL before calling a worker dead
            self._restart_grace_until = time.monotonic() + self.cfg.worker_ttl_s
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
        grace = time.monotonic() < self._restart_grace_until
        moves: list[tuple[GatewayStreamHandle, bool]] = []
        for h, ok in zip(handles, present):
            if h.closed or h.pinning:
                continue
            alive = h.worker in self.workers
            if alive and ok:
                if now - h.refreshed > SESSION_TTL_S / 3:
                    self.r.expire(self.keys.session(h.id), SESSION_TTL_S)
                    h.refreshed = now
                continue
            if not alive and grace:
                continue  # Redis restarted: its worker may be alive but not have beaten again yet
            if not self.workers:
                continue  # nobody to move it to yet; try again next pass
            moves.append((h, alive))
        if len(moves) == 1:
            self._repin(*moves[0])
        elif moves:  # concurrently: a dead worker's sessions all move within one open, not one after another
            with ThreadPoolExecutor(min(len(moves), 16), thread_name_prefix="ditstream-gateway-repin") as pool:
                for f in [pool.submit(self._repin, h, alive) for h, alive in moves]:
                    f.result()
        if moves:  # let the heartbeats count the moved sessions before spreading them again
            self._rebalance_after = time.monotonic() + self.cfg.rebalance_s
        elif not grace and self.cfg.rebalance_s > 0 and time.monotonic() >= self._rebalance_after:
            self._rebalance()

    def _repin(self, h: GatewayStreamHandle, alive: bool) -> None:
        """Move one session. A session moves only when its worker is dead; a lost record (Redis
        restarted) re-opens it on the same worker under a new epoch (that worker drops the old copy)."""
        old = h.worker
        logger.warning("gateway %s: session %s %s; re-pinning", self.id, h.id,
                       f"lost its record (worker {old} alive)" if alive else f"lost its worker {old}")
        h.pinning = True
        try:
            moved = self._pin(h, exclude={old} if len(self.workers) > 1 else set(), prefer=old if alive else None)
        except ValidationError as exc:  # no live worker takes it: tell its client instead of stalling it
            logger.error("session %s cannot be re-opened: %s", h.id, exc.message)
            h.failed = OverloadedError(f"the stream lost its worker and could not be re-opened on another: "
                                       f"{exc.message}", reason="no_worker")
            return
        finally:
            h.pinning = False
        self._settle_move(h, moved, "sessions_repinned")

    def _settle_move(self, h: GatewayStreamHandle, moved: bool, counter: str) -> None:
        """After a re-pin or a rebalancing move: count it, settle the session's pending reconfigures
        and re-send its unanswered frames; a failed open drops the record (``_pin`` wrote the new
        worker before it failed), so the next pass re-opens the session."""
        if moved:
            self.counters[counter] += 1
            self._resolve_controls(h)
            self._resend_unanswered(h)
        else:
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

