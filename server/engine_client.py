"""The one interface the app holds for an engine, in process or behind Redis.

``EngineRunner`` (``engine/runner.py``: the engine thread in this process) and
``RedisGatewayRunner`` (``server/scale/gateway.py``: workers reached through Redis) both implement
``EngineClient``; the app, the REST routes and the WebSocket endpoint see only this type, so they
never ask which one they hold (vLLM's ``EngineClient`` plays the same part for its API server).
``tests/test_engine_client.py`` checks that both implement every member.

Everything here is called from the event loop or a worker thread and must not block on torch:
``add_stream`` may wait for the engine thread (call it in an executor), the rest returns at once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from ditstream.engine.config import EngineConfig, StreamConfig
    from ditstream.engine.limits import EngineLimits
    from ditstream.engine.queues import OutputQueue
    from ditstream.engine.types import MetricsSink, StreamOutput, StreamStats


@runtime_checkable
class EngineStream(Protocol):
    """A live stream as a ``LiveSession`` drives it (``server/live/session.py``): the in-process
    ``engine.runner.StreamHandle`` and the gateway's ``GatewayStreamHandle`` both implement it."""

    id: str
    outputs: OutputQueue[StreamOutput]
    stats: StreamStats

    #: The stream takes frames as the client coded them (``submit_encoded``) and its outputs can
    #: come back coded (``code_outputs``): a gateway's stream, whose worker decodes and encodes.
    #: False in process: the server's codec threads decode frames and encode outputs.
    takes_encoded: bool

    @property
    def config(self) -> StreamConfig: ...

    def submit(self, image: np.ndarray | None, seq: int = 0, ts: float = 0.0) -> bool:
        """Offer a frame, never blocking; True if an unprocessed one was replaced (dropped)."""

    def submit_encoded(self, data: bytes, seq: int, ts: float, fmt: str, width: int, height: int) -> bool:
        """Offer a frame as the client coded it (its header checked: ``fmt``, ``width``, ``height``);
        same contract as ``submit``. Only where ``takes_encoded``; elsewhere it raises."""

    def code_outputs(self, quality: int) -> None:
        """Ask for outputs coded as JPEG at ``quality`` (``StreamOutput.encoded``) where the engine
        codes them (``takes_encoded``); a no-op elsewhere (outputs are pixels for the server to code)."""

    def reconfigure(self, **changes: Any) -> Future:
        """Validate now (raises ``ValidationError``); the future yields the applied config."""

    def close(self) -> None:
        """End the stream; safe twice and after the engine died."""


@runtime_checkable
class EngineClient(Protocol):
    """An engine as the server sees it: open a stream, submit a job, validate, info, limits, health."""

    #: Model, backend, device, size multiple, defaults (``ready`` and ``/v1/models`` show them).
    info: dict[str, Any]
    #: Why the engine stopped, if it did (``/health`` reports it).
    error: BaseException | None

    @property
    def engine_config(self) -> EngineConfig:
        """Batch, queue and request limits the engine was configured with."""

    @property
    def limits(self) -> EngineLimits:
        """What a stream config is validated against, typed: size multiple and profile, pixel and prompt
        bounds, LoRA names, batch and queue depths (the runner's own; the gateway's from its workers)."""

    @property
    def alive(self) -> bool:
        """It can take work now (the engine thread runs; or Redis answers and a worker is up)."""

    @property
    def ready(self) -> bool:
        """Alive and warm: ``/ready`` says yes."""

    @property
    def warming(self) -> list[str]:
        """Shapes still being compiled or captured before ``ready`` (empty when warm)."""

    @property
    def workers_up(self) -> int:
        """Engines serving behind this client (1 in process when ready)."""

    def start(self) -> Any:
        """Start serving (threads, warm-up); returns at once."""

    def stop(self, timeout: float = ...) -> None:
        """Stop serving: pending jobs fail, streams close."""

    def validate(self, cfg: StreamConfig) -> StreamConfig:
        """The engine's own checks (size multiple, profile, limits); raises ``ValidationError``."""

    def add_stream(self, cfg: StreamConfig, notify: Callable[[], None] | None = None,
                   timeout: float | None = ...) -> EngineStream:
        """Open a stream (may wait on the engine: call it from a worker thread)."""

    def submit_job(self, cfg: StreamConfig, image: np.ndarray | None = None,
                   encode: tuple[str, int] | None = None) -> Future:
        """One image; the future yields a ``StreamOutput`` or raises the engine's error. ``encode``
        (format, quality) is how the caller will code it: an engine that can hand the image over
        already coded (the gateway: coded by the worker, never decoded in between) sets
        ``StreamOutput.encoded``; the in-process engine returns pixels."""

    def health(self) -> dict[str, Any]:
        """Extra fields for ``/health`` and ``/ready`` (e.g. Redis and workers in gateway mode)."""

    def stats(self) -> dict[str, Any]:
        """Counters for logs and the bench."""

    def bind_metrics(self, metrics: MetricsSink) -> None:
        """Report model calls and failures (or the workers' figures) to the app's metrics."""

    def prefer_warmup_size(self, width: int, height: int) -> None:
        """The size to warm when the backend has no size profile (the server's default stream size)."""
