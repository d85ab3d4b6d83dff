"""One server, two engines: the REST/WS integration suites run each test against the in-process
engine ("engine") and against the Redis gateway with ``ditstream worker`` processes ("gateway").

``Fleet`` is a loopback ``redis-server`` plus worker processes on one model; ``Fleet.gateway``
serves a gateway app (``create_app(Settings(redis_url=...))``, the runner loaded by ``load_runner``
as in ``ditstream serve --redis``) on that Redis in a ``ServerThread``, ready once it sees every
worker and ``/ready`` is 200. ``serve`` is what the parametrised fixtures call: the same settings,
either with an in-process runner or through a fleet. Timings are the scale tests' short ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ditstream.server.api.app import create_app
from ditstream.server.engine_client import EngineClient
from ditstream.server.settings import Settings

from ditstream.bench.harness import ServerThread
from ditstream.bench.scale_harness import RedisServer, WorkerProcess, redis_server_binary, wait_for

#: What each server fixture is parametrised over.
KINDS = ["engine", "gateway"]
HEARTBEAT_S, TTL_S, CLAIM_IDLE_S, JOB_TIMEOUT_S = 0.4, 2.0, 2.0, 30.0
#: Simulated inference time of the "slow" null engines (queues and admission tests).
SLOW_DELAY_S = 0.5


class Fleet:
    """A private ``redis-server`` and ``workers`` ``ditstream worker`` processes running ``worker_args``."""

    def __init__(self, tmp: Path, *worker_args: str, workers: int = 1, name: str = "w") -> None:
        if redis_server_binary() is None:  # the CI installs it; say so rather than skip silently
            pytest.fail("redis-server is required for the gateway parametrisation (apt-get install -y "
                        "redis-server)", pytrace=False)
        self.tmp = tmp
        self.redis = RedisServer(log_dir=tmp).start()
        self.workers = [WorkerProcess(self.redis.url, *worker_args, "--threads", "1",
                                      "--heartbeat-s", str(HEARTBEAT_S), "--ttl-s", str(TTL_S),
                                      "--claim-idle-s", str(CLAIM_IDLE_S),
                                      worker_id=f"{name}{i}", log=tmp / f"{name}{i}.log").start()
                        for i in range(1, workers + 1)]

    def logs(self) -> str:
        return "\n".join(f"--- {w.worker_id} (running={w.running})\n{w.log_tail(3000)}" for w in self.workers)

    def settings(self, **settings: Any) -> Settings:
        """Gateway settings on this fleet's Redis with the short timings above; ``settings`` override them."""
        return Settings(**{"redis_url": self.redis.url, "job_timeout_s": JOB_TIMEOUT_S,
                           "worker_heartbeat_s": HEARTBEAT_S, "worker_ttl_s": TTL_S,
                           "job_claim_idle_s": CLAIM_IDLE_S, **settings})

    def await_workers(self, runner: Any, ready: Callable[[], bool] = lambda: True) -> None:
        """Wait until the started gateway ``runner`` sees every worker beat and ``ready()`` holds;
        a timeout fails with the workers' logs."""
        ids = {w.worker_id for w in self.workers}
        try:
            wait_for(lambda: ids <= set(runner.workers), 120, what=f"workers {sorted(ids)} beating")
            wait_for(ready, 30, what="the gateway ready")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; worker logs:\n{self.logs()}") from None

    @contextlib.contextmanager
    def gateway(self, **settings: Any) -> Iterator[ServerThread]:
        """A gateway app on this fleet, with these settings; yields once it is ready."""
        with ServerThread(create_app(self.settings(**settings))) as srv:
            self.await_workers(runner_of(srv), lambda: httpx.get(srv.url + "/ready").status_code == 200)
            yield srv

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis.stop()


def runner_of(srv: ServerThread) -> Any:
    """The app's engine: the ``EngineRunner`` or the ``RedisGatewayRunner`` (its ``stats()`` agree on keys)."""
    return srv.app.state.ditstream.runner


@contextlib.contextmanager
def serve(request: pytest.FixtureRequest, fleet: str, runner: Callable[[], EngineClient],
          **settings: Any) -> Iterator[ServerThread]:
    """The server of a fixture parametrised over ``KINDS``: ``create_app(Settings(**settings), runner())``
    in process, or a gateway with those settings on the fleet fixture named ``fleet`` (started only
    when a gateway test runs)."""
    if request.param == "engine":
        with ServerThread(create_app(Settings(**settings), runner())) as srv:
            yield srv
    else:
        with request.getfixturevalue(fleet).gateway(**settings) as srv:
            assert runner_of(srv).info["mode"] == "gateway", "the app must reach its engine through Redis"
            yield srv


@contextlib.contextmanager
def fleet_of(tmp: Path, *worker_args: str, **kw: Any) -> Iterator[Fleet]:
    f = Fleet(tmp, *worker_args, **kw)
    try:
        yield f
    finally:
        f.close()
