"""The batch-formation policy and the two-deep inbox, on a fake clock (no sleeps, no threads)."""

from __future__ import annotations

from collections import Counter

import pytest
from ditstream.engine.batching import BatchPolicy
from ditstream.engine.config import BatchConfig
from ditstream.engine.queues import FrameInbox

TICK = 0.030  # one simulated model call


def simulate(policy: BatchPolicy, respond: dict[str, float], seconds: float = 3.0,
             open_loop: dict[str, float] | None = None, start: dict[str, float] | None = None) -> list[list[str]]:
    """Discrete-event run of the policy alone, around a stand-in engine whose every tick lasts ``TICK``
    and takes every pending frame (so it says nothing about fairness: ``test_engine_fairness`` runs
    the real core for that).

    Closed-loop client ``sid`` sends its next frame ``respond[sid]`` s after its answer; open-loop
    client ``sid`` sends one every ``open_loop[sid]`` s whether answered or not. Returns the
    streams of each tick, in order.
    """
    open_loop = open_loop or {}
    sids = [*respond, *open_loop]
    arrive = dict(start or {sid: 0.001 * i for i, sid in enumerate(sids)})  # next arrival per client
    pending: dict[str, float] = {}
    ticks: list[list[str]] = []
    t = 0.0
    while t < seconds:
        for sid in sids:  # deliver what has arrived by now (latest wins is not exercised here)
            if arrive[sid] is not None and arrive[sid] <= t:
                pending.setdefault(sid, arrive[sid])
                arrive[sid] = arrive[sid] + open_loop[sid] if sid in open_loop else None
        wait = policy.wait_s(t, pending, [s for s in sids if s not in pending]) if pending else None
        if wait == 0.0:  # a tick: take every pending frame, answer them all at its end
            batch = sorted(pending, key=pending.get)
            for sid in batch:
                policy.observe_arrival(sid, pending.pop(sid))
            end = t + TICK
            for sid in batch:
                policy.observe_output(sid, end)
                if sid in respond:
                    arrive[sid] = end + respond[sid]
            policy.observe_tick(t, end)
            ticks.append(batch)
            t = end
            continue
        nxt = [a for a in arrive.values() if a is not None and a > t]
        if wait:
            nxt.append(t + wait)
        t = min(nxt)
    return ticks


def test_staggered_closed_loop_clients_fill_every_call():
    """4 clients answering 1–4 ms after their output: the policy puts all four in every call."""
    respond = {"a": 0.001, "b": 0.002, "c": 0.003, "d": 0.004}
    ticks = simulate(BatchPolicy(BatchConfig()), respond)
    settled = ticks[5:]
    assert Counter(len(b) for b in settled) == {4: len(settled)}
    # ...where starting a tick as soon as any frame is there splits them into alternating groups.
    eager = simulate(BatchPolicy(BatchConfig(max_wait=0.0)), respond)[5:]
    assert max(len(b) for b in eager) < 4
    assert len(settled) > 1.5 * sum(len(b) for b in eager) / 4  # the same work in far fewer calls


def test_closed_loop_groups_merge_after_starting_apart():
    """Two pairs that start half a tick apart (the alternating state) join within a few ticks."""
    respond = {"a": 0.001, "b": 0.0015, "c": 0.002, "d": 0.0025}
    start = {"a": 0.0, "b": 0.0, "c": 0.016, "d": 0.016}
    ticks = simulate(BatchPolicy(BatchConfig()), respond, start=start)
    assert all(len(b) == 4 for b in ticks[6:])


def test_a_lone_stream_never_waits():
    policy = BatchPolicy(BatchConfig())
    ticks = simulate(policy, {"a": 0.003})
    assert len(ticks) > 80
    # the frame that is pending now starts a tick at once, every time
    t = policy.last_tick_end + 0.003
    assert policy.wait_s(t, {"a": t}, []) == 0.0
    # open loop too: a 30 fps camera alone
    policy = BatchPolicy(BatchConfig())
    simulate(policy, {}, open_loop={"cam": 1 / 30})
    assert policy.wait_s(10.0, {"cam": 10.0}, []) == 0.0


def test_an_idle_or_far_stream_is_not_waited_for():
    policy = BatchPolicy(BatchConfig())
    simulate(policy, {"a": 0.002, "b": 0.002}, seconds=1.0)
    end = policy.last_tick_end
    # b was answered at `end` and is expected ~2 ms later: a's frame waits for it, not longer than the deadline
    hold = policy.wait_s(end + 0.001, {"a": end + 0.001}, ["b"])
    assert 0 < hold <= 0.5 * TICK
    # b stopped sending: once overdue it holds nothing
    assert policy.wait_s(end + 0.012, {"a": end + 0.001}, ["b"]) == 0.0
    # a stream with no history yet (just joined) or one sending every second holds nothing either
    policy.observe_arrival("slow", end - 1.0)
    policy.observe_arrival("slow", end)
    assert policy.wait_s(end + 0.001, {"a": end + 0.001}, ["new", "slow"]) == 0.0


def test_open_loop_cameras_keep_their_rate_and_share_calls():
    """4 cameras at 30 fps, staggered over a frame interval, with 30 ms calls: all frames served."""
    period = 1 / 30
    cams = {f"c{i}": period for i in range(4)}
    start = {f"c{i}": period * i / 4 for i in range(4)}
    ticks = simulate(BatchPolicy(BatchConfig()), {}, open_loop=cams, start=start, seconds=3.0)
    served = Counter(s for b in ticks for s in b)
    assert all(n >= 0.97 * 3.0 / period for n in served.values())


def test_max_wait_bounds_the_hold():
    policy = BatchPolicy(BatchConfig(max_wait=0.5))
    simulate(policy, {"a": 0.010, "b": 0.010}, seconds=0.5)
    end = policy.last_tick_end
    assert policy.deadline({"a": end + 0.002}) == pytest.approx(end + 0.002 + 0.5 * policy.tick_s)
    assert policy.wait_s(end + 0.002 + 0.5 * policy.tick_s, {"a": end + 0.002}, ["b"]) == 0.0
    with pytest.raises(ValueError):
        BatchConfig(max_wait=-1)


def test_inbox_keeps_two_in_flight_and_drops_frames_that_sat_through_a_tick():
    box: FrameInbox[int] = FrameInbox(2)
    assert box.put(1) == 0 and box.put(2) == 0  # two frames in flight: both kept
    assert box.take() == 1  # the older first
    assert box.take() == 2  # the newer by the next tick
    assert box.take() is None
    box.put(3)
    box.put(4)
    assert box.take() == 3  # 4 sat through this tick...
    assert box.put(5) == 1  # ...so 5 replaces it (latest wins for a stale frame)
    assert box.take() == 5
    for i in range(6, 10):  # a producer faster than the engine: never more than two pending
        box.put(i)
        assert len(box) <= 2
    assert box.oldest() == 8 and box.take() == 8 and box.dropped == 3
    one: FrameInbox[int] = FrameInbox(1)  # depth 1 is plain latest wins
    one.put(1)
    assert one.put(2) == 1 and one.take() == 2
