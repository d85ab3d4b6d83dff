"""Fairness of the real ``EngineCore``, on a fake clock, with a backend that records every model call.

The engine promises (``engine/batching.py``, ``docs/benchmarks.md``): every tick takes one frame, the
oldest pending, from every stream that has one, whatever ``max_batch`` (more samples become several
calls of the same tick), so no stream starves and equal demand gets equal rates. Here the core, its
inbox and its batch policy are the shipped code; only the model is the null one, whose denoise call
advances the fake clock by ``CALL_S`` (the model time) and whose encode call records which streams'
frames it holds (each stream sends its own flat shade). No threads, no sleeps.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from ditstream.engine.backends.null_backend import NullBackend
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.null import NullPrompts, null_components
from ditstream.engine.types import Frame

CALL_S = 0.030  # one simulated model call
SIZE = 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingBackend(NullBackend):
    """The null backend, plus: each encode call's streams (read from the frames' shades) in ``calls``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(null_components(), delay_s=CALL_S, sleep=clock.advance)
        self.calls: list[list[int]] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        shades = ((images[:, 0, 0, 0] + 1) * 127.5).round().to(torch.int64)  # back to uint8 levels
        self.calls.append([int(s) // SHADE_STEP for s in shades])
        return super().encode(images)


SHADE_STEP = 10  # stream k sends frames of shade 10·k


def _frame(k: int, at: float) -> Frame:
    return Frame(image=np.full((SIZE, SIZE, 3), SHADE_STEP * k, np.uint8), received_at=at)


def run(streams: int, max_batch: int, respond: list[float] | None = None, open_loop: float | None = None,
        seconds: float = 3.0) -> tuple[list[list[list[int]]], EngineCore]:
    """Drive the core as the runner does (ask ``batch_wait``, hold or step), on the fake clock.

    Closed loop: client k sends its next frame ``respond[k]`` s after its answer. Open loop: every
    client sends a frame every ``open_loop`` s, answered or not. Checks at every tick that its calls
    hold exactly one frame of each stream that had one pending, and that each output is its own
    stream's frame. Returns each tick's calls (the streams in each) and the core.
    """
    clock = Clock()
    backend = RecordingBackend(clock)
    core = EngineCore(backend.components, backend, NullPrompts(), EngineConfig(max_batch=max_batch), clock=clock)
    states = [core.add(StreamConfig(prompt="p", mode="img2img", width=SIZE, height=SIZE)) for _ in range(streams)]
    index = {s.id: k for k, s in enumerate(states)}
    arrive: list[float | None] = [0.001 * k for k in range(streams)]  # next arrival per client
    ticks: list[list[list[int]]] = []
    while clock.now < seconds:
        for k, at in enumerate(arrive):
            if at is not None and at <= clock.now:
                core.submit(states[k].id, _frame(k, at))
                arrive[k] = at + open_loop if open_loop is not None else None
        wait = core.batch_wait(clock.now) if core.has_work() else None
        if wait == 0.0:
            pending = sorted(k for k, state in enumerate(states) if state.inbox)
            calls_before = len(backend.calls)
            for out in core.step():
                k = index[out.stream_id]
                assert out.error is None and out.image[0, 0, 0] == SHADE_STEP * k  # its own frame came back
                if respond is not None:
                    arrive[k] = clock.now + respond[k]
            calls = backend.calls[calls_before:]
            served = sorted(k for call in calls for k in call)
            assert served == pending, (served, pending)  # one frame of every stream that had one
            ticks.append(calls)
            continue
        upcoming = [a for a in arrive if a is not None and a > clock.now]
        if wait:
            upcoming.append(clock.now + wait)
        clock.now = min(upcoming)
    return ticks, core


def streams(tick: list[list[int]]) -> list[int]:
    return sorted(k for call in tick for k in call)


def test_more_streams_than_batch_slots_each_get_one_frame_per_tick():
    """10 cameras, 4 samples per call: each tick serves all ten in calls of 4 + 4 + 2, so no stream
    starves and all run at the same rate (a scheduler that took the first four would starve six)."""
    ticks, core = run(streams=10, max_batch=4, open_loop=1 / 30)
    assert len(ticks) > 20
    for tick in ticks[2:]:  # once every camera has sent (its frames come faster than the 90 ms ticks)
        assert streams(tick) == list(range(10)) and [len(call) for call in tick] == [4, 4, 2], tick
    assert core.batch_sizes == Counter(len(call) for tick in ticks for call in tick)
    served = Counter(k for tick in ticks for k in streams(tick))
    assert max(served.values()) - min(served.values()) <= 1


def test_staggered_closed_loop_clients_share_every_call_at_equal_rates():
    """4 clients answering 1–4 ms after their output: the batch policy holds each tick until all four
    are in (calls of 4), and the core serves each once per tick (equal rates)."""
    ticks, _ = run(streams=4, max_batch=16, respond=[0.001, 0.002, 0.003, 0.004])
    settled = ticks[8:]  # they start in alternating groups and merge within a few ticks
    assert len(settled) > 50
    assert all(tick == [[0, 1, 2, 3]] for tick in settled), settled  # one call of four per tick
    served = Counter(k for tick in ticks for k in streams(tick))
    assert max(served.values()) - min(served.values()) <= 1


def test_clients_that_answer_at_once_do_not_take_a_slower_ones_turn():
    """Five clients answering at once and one 20 ms later, 2 samples per call: the fast ones fill a
    tick's calls before the slow one's frame arrives, yet each tick serves all six, one frame each."""
    ticks, _ = run(streams=6, max_batch=2, respond=[0.0, 0.0, 0.0, 0.0, 0.0, 0.020])
    assert len(ticks) > 20
    assert all(streams(tick) == list(range(6)) for tick in ticks[6:]), ticks
