"""The fleet's autoscaling signal: how loaded the live workers are, and how many workers it needs.

An autoscaler (KEDA, deploy/kubernetes/) reads one gauge, ``ditstream_workers_wanted``, from any
gateway. It is computed by a pure function (``workers_wanted``) of a ``FleetLoad``, which the
collector builds at scrape time from what the supervisor last read — the live workers' heartbeats
and the jobs stream's ``JobBacklog`` — so a scrape does no Redis I/O. Every gateway of a fleet sees
the same heartbeats and the same stream, so every gateway exports the same figures (a pass apart).

The formula (docs/deploy.md, "Autoscaling")::

    wanted = ceil(sessions / session_capacity + pending / job_capacity)
    wanted += ceil(queued / job_capacity)    only while the oldest queued job has waited > job_wait_s
    wanted = max(wanted, 1)                  while any job is queued

``pending`` are the jobs workers hold (the group's pending entries), ``queued`` those none has taken.
A stream and a job share one GPU, so their shares add; the capacities are what one live worker is
sized for (its ``--stream-capacity``, its ``--max-jobs``). A worker takes jobs until it holds
``--max-jobs``, so a queue means every live worker is full of jobs — but a burst of quick jobs drains
in milliseconds, and a GPU worker takes minutes to start: the queue asks for workers only once it
has waited ``job_wait_s`` (``AUTOSCALE_JOB_WAIT_S``), then one per ``job_capacity`` jobs in it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ditstream.server.metrics import FLEET_GAUGES, WORKERS_WANTED
from ditstream.server.scale.config import ScaleConfig, sid_str

if TYPE_CHECKING:
    import redis
    from ditstream.server.scale.gateway import RedisGatewayRunner
    from ditstream.server.scale.messages import Heartbeat, Keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobBacklog:
    """The jobs stream as the supervisor last read it (all gateways' jobs)."""

    #: Entries no worker has taken yet (after the group's last-delivered id).
    queued: int = 0
    #: The consumer group's pending entries: delivered to a worker, not acknowledged.
    pending: int = 0
    #: Age of the oldest queued entry, by Redis's clock (its id's time against ``TIME``); 0 when none.
    queued_age_s: float = 0.0


@dataclass(frozen=True)
class FleetLoad:
    """What ``workers_wanted`` decides from: the fleet's load and what one worker is sized for."""

    workers: int
    sessions: int
    #: Jobs held by workers (the group's pending entries) and jobs no worker has taken.
    pending: int
    queued: int
    session_capacity: float
    job_capacity: float
    queued_age_s: float
    job_wait_s: float

    def __post_init__(self) -> None:
        if self.session_capacity <= 0 or self.job_capacity <= 0:
            raise ValueError(f"capacities must be positive: {self.session_capacity}, {self.job_capacity}")


def workers_wanted(load: FleetLoad) -> int:
    """Workers the fleet needs for ``load`` (the module docstring's formula). 0 when nothing is asked:
    the autoscaler's own minimum keeps a warm worker."""
    share = load.sessions / load.session_capacity + load.pending / load.job_capacity
    wanted = math.ceil(round(share, 9))  # 8 / 4 is two workers, not three for a rounding error
    if load.queued and load.queued_age_s > load.job_wait_s:
        wanted += math.ceil(round(load.queued / load.job_capacity, 9))
    return max(wanted, 1) if load.queued else wanted


def fleet_load(workers: dict[str, Heartbeat], backlog: JobBacklog, own_sessions: int, cfg: ScaleConfig) -> FleetLoad:
    """The ``FleetLoad`` of the live ``workers`` (heartbeats) and the jobs ``backlog``.

    Sessions are the heartbeats' sum, or this gateway's own count when that is higher (a session being
    re-pinned is on no worker's count yet, but still wants one). Capacities are the live workers'
    means; while none is live, this gateway's own settings of the same names (``cfg``)."""
    sessions = max(sum(hb.sessions for hb in workers.values()), own_sessions)
    if workers:
        session_capacity = sum(_stream_capacity(hb, cfg.stream_capacity) for hb in workers.values()) / len(workers)
        job_capacity = sum(max(1, hb.max_jobs) for hb in workers.values()) / len(workers)
    else:
        session_capacity, job_capacity = float(cfg.stream_capacity), float(cfg.max_jobs)
    return FleetLoad(workers=len(workers), sessions=sessions, pending=backlog.pending, queued=backlog.queued,
                     session_capacity=session_capacity, job_capacity=job_capacity,
                     queued_age_s=backlog.queued_age_s, job_wait_s=cfg.autoscale_job_wait_s)


def _stream_capacity(hb: Heartbeat, default: int) -> int:
    """A worker's advertised ``stream_capacity`` (in its heartbeat's ``info``); ``default`` for a worker
    of a release that sends none."""
    value = hb.info.get("stream_capacity")
    return value if isinstance(value, int) and value >= 1 else default


def fleet_figures(load: FleetLoad, backlog: JobBacklog) -> dict[str, float | None]:
    """Every gauge of ``FLEET_GAUGES`` for ``load`` (None: no sample, e.g. per worker with none live)."""
    per = (lambda n: n / load.workers) if load.workers else (lambda n: None)
    return {
        "ditstream_fleet_sessions": load.sessions,
        "ditstream_fleet_sessions_per_worker": per(load.sessions),
        "ditstream_fleet_session_capacity_per_worker": load.session_capacity,
        "ditstream_fleet_jobs": load.pending + load.queued,
        "ditstream_fleet_jobs_per_worker": per(load.pending),
        "ditstream_fleet_job_capacity_per_worker": load.job_capacity,
        "ditstream_fleet_jobs_queued": backlog.queued,
        "ditstream_fleet_jobs_pending": backlog.pending,
        "ditstream_fleet_queued_job_age_seconds": load.queued_age_s,
        WORKERS_WANTED: workers_wanted(load),
    }


def read_backlog(r: redis.Redis, keys: Keys) -> JobBacklog:
    """The jobs stream's backlog: two round trips (lengths and the group's position, then the first
    entry past that position). Jobs leave the stream when answered (``XACK`` + ``XDEL``), so its
    length is queued + pending."""
    pipe = r.pipeline(transaction=False)
    pipe.xlen(keys.jobs)
    pipe.xpending(keys.jobs, keys.group)
    pipe.xinfo_groups(keys.jobs)
    pipe.time()
    length, pending, groups, (seconds, micros) = pipe.execute()
    held = int(pending["pending"])
    last = next((g["last-delivered-id"] for g in groups if sid_str(g["name"]) == keys.group), "0-0")
    first = r.xrange(keys.jobs, min=f"({sid_str(last)}", count=1)
    age = 0.0
    if first:
        born_ms = int(sid_str(first[0][0]).partition("-")[0])
        age = max(0.0, seconds + micros / 1e6 - born_ms / 1e3)
    return JobBacklog(queued=max(0, int(length) - held), pending=held, queued_age_s=age)


class AutoscaleCollector:
    """Prometheus collector of ``FLEET_GAUGES``, from the supervisor's snapshot (no Redis I/O on scrape)."""

    def __init__(self, gateway: RedisGatewayRunner) -> None:
        self.gw = gateway

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        backlog = self.gw.fleet.backlog
        load = fleet_load(self.gw.fleet.workers, backlog, self.gw.sessions.count(), self.gw.cfg)
        figures = fleet_figures(load, backlog)
        if set(figures) != set(FLEET_GAUGES):  # one table of names: a misspelt figure fails loudly
            raise KeyError(f"fleet figures {sorted(set(figures) ^ set(FLEET_GAUGES))} not in FLEET_GAUGES")
        for name, help_text in FLEET_GAUGES.items():
            family = GaugeMetricFamily(name, help_text)
            if (value := figures[name]) is not None:
                family.add_metric([], float(value))
            yield family
