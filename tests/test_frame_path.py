"""Frames reach a stream through its own inbox: no thread but the engine's touches the core's tables."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import CancelledError
from ditstream.engine.null import null_runner


class EngineThreadOnly(dict):
    """The core's stream table, recording every thread that reads or writes it."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.threads: set[str] = set()

    def _seen(self) -> None:
        self.threads.add(threading.current_thread().name)

    def __getitem__(self, key):
        self._seen()
        return super().__getitem__(key)

    def __setitem__(self, key, value) -> None:
        self._seen()
        super().__setitem__(key, value)

    def get(self, *a):
        self._seen()
        return super().get(*a)

    def pop(self, *a):
        self._seen()
        return super().pop(*a)

    def values(self):
        self._seen()
        return super().values()


def test_submitting_from_other_threads_never_touches_the_core_tables():
    runner = null_runner()
    table = EngineThreadOnly()
    runner.core.streams = table
    runner.start()
    try:
        runner.wait_ready(30)
        handles = [runner.add_stream(StreamConfig(prompt="x", width=32, height=32)) for _ in range(3)]
        img = np.zeros((32, 32, 3), np.uint8)
        done = threading.Barrier(4)

        def codec_thread(handle) -> None:
            for seq in range(50):
                handle.submit(img, seq)
            done.wait(30)

        threads = [threading.Thread(target=codec_thread, args=(h,), name=f"codec-{i}") for i, h in enumerate(handles)]
        for t in threads:
            t.start()
        done.wait(30)
        for t in threads:
            t.join(30)
        for h in handles:
            assert h.outputs.get(timeout=30) is not None  # the frames were taken and answered
        handles[0].close()
    finally:
        runner.stop()
    assert table.threads == {runner.name}, f"the core's stream table was touched from {table.threads}"


def test_a_closed_stream_refuses_frames_cleanly():
    runner = null_runner().start()
    try:
        runner.wait_ready(30)
        handle = runner.add_stream(StreamConfig(prompt="x", width=32, height=32))
        handle.close()
        handle._state.outputs.get(timeout=5)  # closing is applied by the engine thread
        with pytest.raises(CancelledError):
            handle.submit(np.zeros((32, 32, 3), np.uint8), 1)
    finally:
        runner.stop()
