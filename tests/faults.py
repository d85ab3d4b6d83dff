"""A fault-injecting backend for the failure-isolation tests: wraps a real backend.

``inject(stage, ...)`` queues one fault for the next call of ``stage`` (``encode``, ``denoise`` or
``decode``) whose input matches ``when``: either raise ``error`` or run the real call and overwrite
the chosen samples of its output with NaN. ``fired`` is set when a fault fired, so tests wait on an
event, never on a sleep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from ditstream.engine.backends.base import Backend

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


@dataclass
class Fault:
    stage: str
    error: Exception | None = None
    nan_samples: tuple[int, ...] = ()
    when: Callable[[torch.Tensor], bool] | None = None
    times: int = 1
    fired: threading.Event = field(default_factory=threading.Event)


class FaultyBackend(Backend):
    """Delegates to ``inner`` except for the calls a queued ``Fault`` matches."""

    name = "faulty"

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.components)
        self.inner = inner
        self.faults: list[Fault] = []
        self.calls = {"encode": 0, "denoise": 0, "decode": 0}
        self._lock = threading.Lock()

    def inject(self, stage: str, *, error: Exception | None = None, nan_samples: tuple[int, ...] = (),
               when: Callable[[torch.Tensor], bool] | None = None, times: int = 1) -> Fault:
        assert stage in self.calls and (error is not None or nan_samples)
        fault = Fault(stage, error, tuple(nan_samples), when, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _match(self, stage: str, x: torch.Tensor) -> Fault | None:
        with self._lock:
            self.calls[stage] += 1
            for f in self.faults:
                if f.stage == stage and f.times > 0 and (f.when is None or f.when(x)):
                    f.times -= 1
                    return f
        return None

    def _run(self, stage: str, x: torch.Tensor, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        fault = self._match(stage, x)
        if fault is None:
            return call()
        try:
            if fault.error is not None:
                raise fault.error
            out = call().clone()
            for i in fault.nan_samples:
                out[i] = float("nan")
            return out
        finally:
            fault.fired.set()

    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        return self._run("denoise", x, lambda: self.inner.denoise(x, timestep, encoder_hidden_states,
                                                                    encoder_attention_mask, guidance))

    def encode(self, images):
        return self._run("encode", images, lambda: self.inner.encode(images))

    def decode(self, latents):
        return self._run("decode", latents, lambda: self.inner.decode(latents))


def faulty_core(components, config=None):
    """An ``EngineCore`` over ``FaultyBackend(torch)`` of ``components``; returns (core, backend)."""
    from ditstream.engine.backends import create_backend
    from ditstream.engine.config import EngineConfig
    from ditstream.engine.core import EngineCore
    from ditstream.engine.prompt_cache import PromptCache

    backend = FaultyBackend(create_backend("torch", components))
    core = EngineCore(components, backend, PromptCache(components), config or EngineConfig())
    return core, backend


def width_is(width: int, scale: int = 1) -> Callable[[torch.Tensor], bool]:
    """``when`` matching calls whose input is ``width`` pixels (or latents at ``scale``) wide."""
    return lambda x: int(x.shape[-1]) == width // scale


def faulty_runner(model_dir, engine_config=None):
    """A (not started) ``EngineRunner`` over the tiny model whose backend is wrapped by ``FaultyBackend``."""
    from ditstream.engine.config import EngineConfig, ModelConfig
    from ditstream.engine.runner import EngineRunner

    runner = EngineRunner.from_config(ModelConfig(model=str(model_dir)), engine_config or EngineConfig())
    backend = FaultyBackend(runner.core.backend)
    runner.core.backend = backend
    return runner, backend
