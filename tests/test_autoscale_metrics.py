"""The fleet's autoscaling signal (``server/scale/autoscale.py``): the formula as a pure function, and
the gauges read from a gateway's ``/metrics`` moving as load is added to real workers over a real
``redis-server`` (in-process null workers whose model calls wait on a gate the test holds, so jobs
stay held or queued exactly as long as the test needs)."""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.server.metrics import FLEET_GAUGES, WORKERS_WANTED
from ditstream.server.scale.autoscale import FleetLoad, JobBacklog, fleet_load, workers_wanted
from ditstream.server.scale.config import ScaleConfig
from ditstream.server.scale.messages import Heartbeat
from prometheus_client.parser import text_string_to_metric_families

from ditstream.bench.scale_harness import wait_for

pytestmark = pytest.mark.timeout(60)


def _load(**kw: float) -> FleetLoad:
    base = {"workers": 1, "sessions": 0, "pending": 0, "queued": 0, "session_capacity": 4.0, "job_capacity": 4.0,
            "queued_age_s": 0.0, "job_wait_s": 5.0}
    return FleetLoad(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("load", "wanted"), [
    (_load(), 0),                                                   # nothing asked: the autoscaler's minimum
    (_load(sessions=8), 2),                                         # 8 / 4 exactly: two, not three
    (_load(sessions=9), 3),
    (_load(sessions=5, pending=3), 2),                              # shares add: 1.25 + 0.75
    (_load(sessions=3, pending=4, session_capacity=6.0), 2),        # 0.5 + 1
    (_load(pending=4, queued=7, queued_age_s=1.0), 1),              # a young queue is a burst: not yet
    (_load(pending=4, queued=7, queued_age_s=6.0), 1 + 2),          # an old one: ceil(7 / 4) more
    (_load(workers=0, queued=1), 1),                                # a job and no worker: one, at once
    (_load(workers=0, queued=9, queued_age_s=9.0, job_capacity=2.0), 5),
])
def test_workers_wanted_formula(load: FleetLoad, wanted: int):
    assert workers_wanted(load) == wanted


def test_fleet_load_from_heartbeats():
    """Capacities are the live workers' means (a worker of an older release counts at the gateway's
    own setting); sessions never fewer than the gateway's own; no worker → the gateway's settings."""
    cfg = ScaleConfig(redis_url="redis://unused", max_jobs=3, stream_capacity=5, autoscale_job_wait_s=2.0)
    hbs = {"a": Heartbeat(worker="a", sessions=3, max_jobs=2, info={"stream_capacity": 2}),
           "b": Heartbeat(worker="b", sessions=1, max_jobs=4, info={})}
    load = fleet_load(hbs, JobBacklog(queued=2, pending=5, queued_age_s=1.5), 1, cfg)
    assert load == FleetLoad(workers=2, sessions=4, pending=5, queued=2, session_capacity=3.5, job_capacity=3.0,
                             queued_age_s=1.5, job_wait_s=2.0)
    assert fleet_load(hbs, JobBacklog(), 9, cfg).sessions == 9
    empty = fleet_load({}, JobBacklog(queued=1), 2, cfg)
    assert (empty.workers, empty.sessions, empty.session_capacity, empty.job_capacity) == (0, 2, 5.0, 3.0)
    with pytest.raises(ValueError, match="capacities must be positive"):
        _load(job_capacity=0.0)


def test_fleet_gauges_follow_the_conventions():
    assert WORKERS_WANTED in FLEET_GAUGES
    for name, help_text in FLEET_GAUGES.items():
        assert name.startswith("ditstream_") and not name.endswith("_total"), name
        assert len(help_text) > 30 and help_text.endswith("."), name


# ------------------------------------------------------------------------------------ on /metrics
def _gated_worker(scfg: ScaleConfig, wid: str, gate: threading.Event):  # -> Worker
    """A null worker whose every model call waits for ``gate`` (set: runs at once)."""
    from ditstream.engine.backends.null_backend import NullBackend
    from ditstream.engine.core import EngineCore
    from ditstream.engine.null import NullPrompts, null_components
    from ditstream.engine.runner import EngineRunner
    from ditstream.server.scale.worker import Worker

    components = null_components()
    backend = NullBackend(components, delay_s=1.0, sleep=lambda _s: gate.wait(30))
    runner = EngineRunner(EngineCore(components, backend, NullPrompts(), EngineConfig()))
    runner.info = {"model": "null", "backend": "null", "device": "cpu", "dtype": "uint8",
                   "size_multiple": runner.core.size_multiple, "defaults": {}}
    return Worker(runner, scfg, worker_id=wid).start()


def _scrape(url: str) -> dict[str, float | None]:
    text = httpx.get(url + "/metrics", timeout=5).text
    found: dict[str, float | None] = dict.fromkeys(FLEET_GAUGES)
    for family in text_string_to_metric_families(text):
        if family.name in found and family.samples:
            found[family.name] = family.samples[0].value
    return found


def _settle(url: str, want: dict[str, float | None], what: str) -> dict[str, float | None]:
    """Scrape until every figure in ``want`` reads as given (heartbeats and passes are a beat apart)."""
    seen: dict[str, float | None] = {}

    def ok() -> bool:
        nonlocal seen
        seen = _scrape(url)
        return all(seen[k] == v for k, v in want.items())

    try:
        wait_for(ok, 10, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: wanted {want}, /metrics says {seen}") from None
    return seen


def test_gateway_metrics_move_with_the_load(redis_url: str):
    """One worker sized for 2 streams and 2 jobs, then a second sized for 6: sessions, then jobs held
    and queued, move every figure, and ``ditstream_workers_wanted`` follows the formula."""
    from ditstream.server.api.app import create_app
    from ditstream.server.scale.gateway import RedisGatewayRunner
    from ditstream.server.settings import Settings

    from ditstream.bench.harness import ServerThread

    prefix = f"as{uuid.uuid4().hex[:8]}"
    base = dict(redis_url=redis_url, prefix=prefix, heartbeat_s=0.1, worker_ttl_s=2.0, supervise_s=0.05,
                rebalance_s=0, max_jobs=2, autoscale_job_wait_s=1.0)
    gate = threading.Event()
    gate.set()
    gw = RedisGatewayRunner(ScaleConfig(**base, stream_capacity=3), EngineConfig())  # type: ignore[arg-type]
    workers = [_gated_worker(ScaleConfig(**base, stream_capacity=2), "w1", gate)]  # type: ignore[arg-type]
    jobs = []
    try:
        with ServerThread(create_app(Settings(redis_url=redis_url, model="null"), gw)) as srv:
            wait_for(lambda: "w1" in gw.workers, 10, what="w1 beating")
            idle = _settle(srv.url, {"ditstream_fleet_sessions": 0, WORKERS_WANTED: 0}, "idle")
            assert idle["ditstream_fleet_session_capacity_per_worker"] == 2  # the worker's, not the gateway's 3
            assert idle["ditstream_fleet_job_capacity_per_worker"] == 2
            cfg = StreamConfig(mode="txt2img", prompt="p", width=64, height=64)
            streams = [gw.add_stream(cfg) for _ in range(3)]
            _settle(srv.url, {"ditstream_fleet_sessions": 3, "ditstream_fleet_sessions_per_worker": 3,
                              WORKERS_WANTED: 2}, "3 streams on a worker sized for 2")
            workers.append(_gated_worker(ScaleConfig(**base, stream_capacity=6), "w2", gate))  # type: ignore[arg-type]
            _settle(srv.url, {"ditstream_fleet_session_capacity_per_worker": 4, "ditstream_fleet_sessions_per_worker":
                              1.5, WORKERS_WANTED: 1}, "a second worker sized for 6")
            gate.clear()  # every model call now waits: jobs stay where they are
            jobs = [gw.submit_job(cfg) for _ in range(6)]
            held = _settle(srv.url, {"ditstream_fleet_jobs_pending": 4, "ditstream_fleet_jobs_queued": 2,
                                     "ditstream_fleet_jobs": 6, "ditstream_fleet_jobs_per_worker": 2},
                           "6 jobs on two workers holding 2 each")
            young = held["ditstream_fleet_queued_job_age_seconds"] <= 1.0
            assert held[WORKERS_WANTED] == (3 if young else 4), held  # ceil(3/4 + 4/2), + ceil(2/2) once old
            old = _settle(srv.url, {WORKERS_WANTED: 4}, "the queue waited past AUTOSCALE_JOB_WAIT_S")
            assert old["ditstream_fleet_queued_job_age_seconds"] > 1.0
            gate.set()
            for job in jobs:
                job.result(timeout=10)
            _settle(srv.url, {"ditstream_fleet_jobs": 0, "ditstream_fleet_queued_job_age_seconds": 0,
                              WORKERS_WANTED: 1}, "jobs answered")
            for s in streams:
                s.close()
            _settle(srv.url, {"ditstream_fleet_sessions": 0, WORKERS_WANTED: 0}, "streams closed")
    finally:
        gate.set()
        for w in workers:
            w.stop(drain_s=2.0)
        gw.stop()


def test_the_docs_list_every_fleet_gauge():
    """docs/deploy.md ("Autoscaling") names every gauge of the signal and no other ``ditstream_fleet_*``."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    section = text.split("## Autoscaling", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(ditstream_(?:fleet_\w+|workers_wanted))`", section))
    assert named == set(FLEET_GAUGES)
