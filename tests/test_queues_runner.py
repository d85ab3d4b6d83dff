"""Queues and the runner thread: latest-wins input, bounded output, jobs, death and cancellation."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ditstream.engine.config import EngineConfig, FilterConfig, StreamConfig
from ditstream.engine.errors import EngineDeadError, ValidationError
from ditstream.engine.null import null_runner
from ditstream.engine.queues import LatestSlot, OutputQueue
from ditstream.engine.runner import EngineRunner

SIZE = 32


def test_latest_slot_newest_wins_and_counts_drops():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True
    assert slot.put(3) is True
    assert slot.take() == 3
    assert slot.take() is None
    assert slot.dropped == 2


def test_output_queue_is_bounded_and_drops_oldest():
    q: OutputQueue[int] = OutputQueue(3)
    for i in range(10):
        q.put(i)
    assert len(q) == 3
    assert q.dropped == 7
    assert q.drain() == [7, 8, 9]
    q.close()
    assert q.get(timeout=0.01) is None


def test_fast_producer_never_grows_memory_and_newest_wins():
    """A producer far faster than the engine: at most one pending input, bounded outputs, drops counted."""
    runner = null_runner(EngineConfig(output_queue_size=2), delay_s=0.02).start()
    try:
        h = runner.add_stream(StreamConfig(prompt="p", width=SIZE, height=SIZE))
        n = 300
        for i in range(n):
            img = np.full((SIZE, SIZE, 3), i % 256, np.uint8)
            h.submit(img, seq=i)
            assert len(h.outputs) <= 2
        time.sleep(0.2)
        st = h.stats
        assert st.processed + st.dropped_inputs == n  # every frame either ran or was replaced
        assert st.dropped_inputs > n / 2
        assert st.dropped_outputs == st.processed - len(h.outputs)
        outs = h.outputs.drain()
        assert outs[-1].seq == n - 1  # the newest frame won
        assert [o.seq for o in outs] == sorted(o.seq for o in outs)
    finally:
        runner.stop()


def test_runner_jobs_are_batched_and_equal_sequential(tiny_model_dir, tiny_generator):
    from ditstream.engine.config import ModelConfig

    runner = EngineRunner.from_config(ModelConfig(model=str(tiny_model_dir)), EngineConfig()).start()
    try:
        cfgs = [StreamConfig(prompt="a cat", mode="txt2img", steps=2, seed=s, width=SIZE, height=SIZE) for s in range(4)]
        futures = [runner.submit_job(c) for c in cfgs]
        results = [f.result(timeout=60) for f in futures]
        for c, r in zip(cfgs, results, strict=True):
            ref = tiny_generator.generate(c)
            assert np.abs(r.image.astype(int) - ref.astype(int)).max() <= 1
        assert max(runner.core.batch_sizes) > 1  # jobs shared model calls
        assert runner.stats()["jobs"] == 0 and not runner.core.streams
    finally:
        runner.stop()


def test_cancelled_job_never_runs():
    runner = null_runner(delay_s=0.3).start()
    try:
        h = runner.add_stream(StreamConfig(prompt="x", width=SIZE, height=SIZE))
        h.submit(np.zeros((SIZE, SIZE, 3), np.uint8))  # keeps the loop busy in a 0.3 s tick
        time.sleep(0.05)
        fut = runner.submit_job(StreamConfig(prompt="x", mode="txt2img", width=SIZE, height=SIZE))
        assert fut.cancel()
        h.outputs.get(timeout=2)
        time.sleep(0.1)
        assert fut.cancelled()
        assert not any(s.one_shot for s in runner.core.streams.values())
        assert runner.stats()["jobs"] == 0
    finally:
        runner.stop()


def test_validation_happens_in_the_callers_thread():
    runner = null_runner().start()
    try:
        with pytest.raises(ValidationError):
            runner.add_stream(StreamConfig(prompt="x", steps=9, width=SIZE, height=SIZE))
        h = runner.add_stream(StreamConfig(prompt="x", width=SIZE, height=SIZE))
        with pytest.raises(ValidationError):
            h.submit(np.zeros((SIZE + 8, SIZE, 3), np.uint8))  # wrong size
        with pytest.raises(ValidationError):
            h.reconfigure(strength=3.0)
        with pytest.raises(ValidationError):
            h.reconfigure(no_such_key=1)
        assert h.reconfigure(prompt="y").result(5).prompt == "y"
    finally:
        runner.stop()


def test_engine_death_is_loud_and_fails_waiters():
    runner = null_runner().start()
    h = runner.add_stream(StreamConfig(prompt="x", width=SIZE, height=SIZE))

    def boom():
        raise RuntimeError("simulated CUDA error")

    runner.core._denoise_all = boom  # the next tick dies
    h.submit(np.zeros((SIZE, SIZE, 3), np.uint8))
    deadline = time.time() + 5
    while runner.alive and time.time() < deadline:
        time.sleep(0.01)
    assert not runner.alive
    assert isinstance(runner.error, RuntimeError)
    assert h.outputs.closed
    with pytest.raises(EngineDeadError):
        h.submit(np.zeros((SIZE, SIZE, 3), np.uint8))
    with pytest.raises(EngineDeadError):
        runner.submit_job(StreamConfig(prompt="x", mode="txt2img", width=SIZE, height=SIZE))
    runner.stop()


def test_skipped_frames_resend_previous_output_in_order():
    runner = null_runner().start()
    try:
        cfg = StreamConfig(prompt="x", width=SIZE, height=SIZE,
                           filter=FilterConfig(enabled=True, threshold=0.98, max_skip=3, seed=0))
        h = runner.add_stream(cfg)
        img = np.full((SIZE, SIZE, 3), 90, np.uint8)
        got = []
        for i in range(8):
            h.submit(img, seq=i)
            o = h.outputs.get(timeout=2)
            got.append(o)
        assert [o.seq for o in got] == list(range(8))
        assert [o.skipped for o in got] == [False, True, True, True, False, True, True, True]
        assert all(np.array_equal(o.image, img) for o in got)
        assert h.stats.skipped == 6 and h.stats.processed == 2
    finally:
        runner.stop()
