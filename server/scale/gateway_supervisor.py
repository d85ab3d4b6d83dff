"""The gateway's supervisor: which workers live, and moving sessions whose worker did not.

``Fleet`` is what the supervisor last read: the live workers' heartbeats, the jobs stream's
backlog (the autoscaling signal's input, ``autoscale.py``) and whether Redis answered. Only the
supervisor writes it (replacing the dict whole); the rest of the gateway reads it.

Each pass (every ``supervise_s``): refresh the workers from their TTL'd heartbeat keys and read the
jobs backlog; when another Redis answers (a restart, or a Sentinel failover to a replica) re-send
the pending jobs it lacks; re-pin sessions whose worker is gone or whose record vanished; spread
sessions again when workers return; fail jobs past their deadline.

Another Redis is told by its ``run_id``. What it kept is not guessed from how we reach it: a
restarted Redis without persistence kept nothing, a promoted replica kept what reached it before
the primary died (all but the last moment's writes). So each pending job is looked up: its stream
entry, or its ``done:`` mark (answered: the answer is in our reply stream, written with the mark),
and only the jobs with neither are sent again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ditstream.engine.errors import OverloadedError, ValidationError
from ditstream.server.scale.autoscale import JobBacklog, read_backlog
from ditstream.server.scale.config import Backoff, ScaleConfig, conn_errors, ensure_group, is_nogroup, sid_str
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.gateway_jobs import GatewayJobs
from ditstream.server.scale.gateway_sessions import GatewaySessions
from ditstream.server.scale.gateway_stream import GatewayStreamHandle
from ditstream.server.scale.messages import SESSION_TTL_S, Heartbeat

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)


class Fleet:
    """The supervisor's snapshot of the workers (live heartbeats, with the limits they advertise), of
    the jobs stream (its backlog) and of Redis (answered last pass)."""

    def __init__(self) -> None:
        self.workers: dict[str, Heartbeat] = {}
        self.backlog = JobBacklog()
        self.redis_ok = False

    def set_workers(self, live: dict[str, Heartbeat]) -> None:
        self.workers = live


class Supervisor:
    """Keeps ``fleet`` current and the sessions on live workers; expires jobs."""

    def __init__(self, r: redis.Redis, cfg: ScaleConfig, gateway_id: str, fleet: Fleet, jobs: GatewayJobs,
                 sessions: GatewaySessions, counters: Counters, stop: threading.Event, *,
                 running: Callable[[], bool]) -> None:
        self.r = r
        self.cfg = cfg
        self.keys = cfg.keys
        self.id = gateway_id
        self.fleet = fleet
        self.jobs = jobs
        self.sessions = sessions
        self.counters = counters
        self.running = running
        self._stop = stop
        self._run_id: str | None = None
        self._restart_grace_until = 0.0
        self._rebalance_after = 0.0

    def loop(self) -> None:
        backoff = Backoff(f"gateway {self.id} supervisor", self._stop)
        while not self._stop.is_set():
            try:
                self.supervise_once()
                backoff.ok()
            except conn_errors() as exc:
                self.fleet.redis_ok = False
                backoff.failed(exc)
                continue
            self._stop.wait(self.cfg.supervise_s)

    def supervise_once(self) -> None:
        """One pass: workers, Redis restarts, orphaned sessions, overdue jobs."""
        try:
            run_id = str(self.r.info("server").get("run_id"))
            ensure_group(self.r, self.keys)
        except conn_errors():
            self.fleet.redis_ok = False
            self.fleet.set_workers({})
            if not self.running():
                return
            raise
        self.r.set(self.keys.gateway(self.id), b"1", px=int(self.cfg.gateway_ttl_s * 1e3))
        restarted = self._run_id is not None and run_id != self._run_id
        if restarted:  # heartbeats may have vanished with the data: wait a TTL before calling a worker dead
            self._restart_grace_until = time.monotonic() + self.cfg.worker_ttl_s
        self.fleet.redis_ok = True
        self._refresh_workers()
        self._read_backlog()
        if restarted:
            lost = self.lost_jobs()
            self.jobs.resend(lost)
            logger.warning("gateway %s: another Redis answers (a restart or a failover): %d pending job(s) lost, "
                           "re-sent; %d kept", self.id, len(lost), self.jobs.count() - len(lost))
        self._run_id = run_id  # only now: a pass cut short by another outage looks the jobs up again
        self.check_sessions()
        self.jobs.expire()

    def lost_jobs(self) -> list[str]:
        """The pending jobs this Redis has neither an entry nor a ``done:`` mark of (both: it lost them).
        A job not yet sent has no entry to look up: the publisher sends it anyway."""
        sent = self.jobs.sent_entries()
        if not sent:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job, entry in sent.items():
            pipe.xrange(self.keys.jobs, entry, entry)
            pipe.exists(self.keys.done(job))
        found = pipe.execute()
        return [job for k, job in enumerate(sent) if not found[2 * k] and not found[2 * k + 1]]

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
        lost = set(self.fleet.workers) - set(live)
        if lost:
            logger.warning("gateway %s: worker(s) %s stopped beating", self.id, ", ".join(sorted(lost)))
        self.fleet.set_workers(live)

    def _read_backlog(self) -> None:
        """Refresh ``fleet.backlog``; a group that vanished since ``ensure_group`` (Redis restarted
        mid-pass) keeps the last figures until the next pass re-creates it."""
        import redis as _redis

        try:
            self.fleet.backlog = read_backlog(self.r, self.keys)
        except _redis.ResponseError as exc:
            if not is_nogroup(exc) and "no such key" not in str(exc):
                raise

    def check_sessions(self) -> None:
        """Re-pin sessions whose worker is gone or whose record vanished; refresh the others' TTL."""
        handles = [h for h in self.sessions.handles() if h.worker and not h.pinning]
        if not handles:
            return
        exists = self.r.pipeline(transaction=False)
        for h in handles:
            exists.exists(self.keys.session(h.id))
        present = exists.execute()
        now = time.monotonic()
        grace = time.monotonic() < self._restart_grace_until
        workers = self.fleet.workers
        moves: list[tuple[GatewayStreamHandle, bool]] = []
        for h, ok in zip(handles, present):
            if h.closed or h.pinning:
                continue
            alive = h.worker in workers
            if alive and ok:
                if now - h.refreshed > SESSION_TTL_S / 3:
                    self.sessions.refresh_record(h, now)
                continue
            if not alive and grace:
                continue  # Redis restarted: its worker may be alive but not have beaten again yet
            if not workers:
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
            exclude = {old} if len(self.fleet.workers) > 1 else set()
            moved = self.sessions.pin(h, exclude=exclude, prefer=old if alive else None)
        except ValidationError as exc:  # no live worker takes it: tell its client instead of stalling it
            logger.error("session %s cannot be re-opened: %s", h.id, exc.message)
            h.failed = OverloadedError(f"the stream lost its worker and could not be re-opened on another: "
                                       f"{exc.message}", reason="no_worker")
            return
        finally:
            h.pinning = False
        self._settle_move(h, moved, "sessions_repinned")

    def _rebalance(self) -> None:
        """Move one of this gateway's sessions from the busiest live worker to the idlest while they
        differ by two or more sessions: a worker that returns (or joins) takes its share instead of
        idling while the survivors carry every stream. The move is the re-pin's clean handover: a
        new epoch, the old worker closes the session at its first frame of that epoch, unanswered
        frames are re-sent and the client sees each frame once, in order. One move per
        ``rebalance_s``, so heartbeat counts catch up before the next decision."""
        self._rebalance_after = time.monotonic() + self.cfg.rebalance_s
        loads = self.sessions.loads()
        if len(loads) < 2:
            return
        busiest = max(loads, key=lambda w: loads[w])
        idlest = min(loads, key=lambda w: loads[w])
        if loads[busiest] - loads[idlest] < 2:
            return
        h = next((h for h in self.sessions.handles() if h.worker == busiest and not h.pinning and not h.closed), None)
        if h is None:
            return  # the busiest worker's sessions are other gateways'; they rebalance their own
        logger.info("gateway %s: moving session %s from %s (%d sessions) to %s (%d)", self.id, h.id, busiest,
                    loads[busiest], idlest, loads[idlest])
        h.pinning = True
        try:
            moved = self.sessions.pin(h, exclude=set(), prefer=idlest)
        except ValidationError as exc:
            logger.error("session %s cannot be moved: %s", h.id, exc.message)
            moved = False
        finally:
            h.pinning = False
        self._settle_move(h, moved, "sessions_rebalanced")

    def _settle_move(self, h: GatewayStreamHandle, moved: bool, counter: str) -> None:
        """After a re-pin or a rebalancing move: count it, settle the session's pending reconfigures
        and re-send its unanswered frames; a failed open drops the record (``pin`` wrote the new
        worker before it failed), so the next pass re-opens the session."""
        if moved:
            self.counters.add(counter)
            self.sessions.resolve_controls(h)
            self.sessions.resend_unanswered(h)
        else:
            self.sessions.forget_record(h)
