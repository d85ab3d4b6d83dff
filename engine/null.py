"""A null engine: echoes frames with no model, for measuring server overhead and for server tests.

``NullCore`` has the ``EngineCore`` interface the runner needs; img2img outputs are the input
image itself, txt2img outputs a flat grey frame. Everything around it (runner thread, queues,
filter, counters) is the real code, so ``ditstream bench server --null`` isolates the server.
"""

from __future__ import annotations

import time

import numpy as np
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.runner import EngineRunner
from ditstream.engine.stream import InFlight, StreamState


class NullCore(EngineCore):
    """Same interface as ``EngineCore``; no model, one tick per frame."""

    def __init__(self, config: EngineConfig | None = None, size_multiple: int = 8, delay_s: float = 0.0) -> None:
        self.config = config or EngineConfig()
        self.streams: dict[str, StreamState] = {}
        self.batch_sizes: list[int] = []
        self.on_batch = None
        self.on_failure = None
        self._init_failures()
        self._init_batching()
        self._size_multiple = size_multiple
        self.delay_s = delay_s

    @property
    def size_multiple(self) -> int:
        return self._size_multiple

    def _plan(self, cfg: StreamConfig) -> None:
        return None  # no model: frames need no noise, angles or embeddings

    def _admit_new_frames(self) -> None:
        now = time.perf_counter()
        for state in self.streams.values():
            frame = state.inbox.take()
            if frame is None:
                continue
            self.batching.observe_arrival(state.id, frame.received_at)
            item = _NullItem(frame=frame, plan=None, x=None, taken_at=now)
            if frame.image is not None and state.filter.should_skip(frame.image):
                item.skipped = True
            elif frame.image is not None:
                item.result = frame.image
            else:
                c = state.config
                item.result = np.full((c.height, c.width, 3), 128, dtype=np.uint8)
            state.pipeline.append(item)

    def _denoise_all(self) -> None:
        """The simulated model call: ``delay_s`` per tick, counted as every computed frame's inference time."""
        t0 = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        dt = time.perf_counter() - t0
        items = [it for s in self.streams.values() for it in s.pipeline]
        if items:
            self.batch_sizes.append(len(items))
            if self.on_batch is not None:
                self.on_batch(len(items), dt)
        for it in items:
            if not it.skipped:
                it.inference_s += dt


class _NullItem(InFlight):
    @property
    def done(self) -> bool:
        return True


def null_runner(config: EngineConfig | None = None, **kwargs) -> EngineRunner:
    """A started-ready runner around a ``NullCore``."""
    runner = EngineRunner(NullCore(config, **kwargs))
    runner.info = {"model": "null", "backend": "null", "device": "cpu", "dtype": "uint8",
                   "size_multiple": runner.core.size_multiple, "defaults": {}}
    return runner
