"""When a tick starts: a pure batch-formation policy, driven by a clock the caller passes in.

Starting a tick the moment any stream has a frame batches open-loop clients (cameras sending at
their own rate) well, but not closed-loop ones (each sends its next frame when its previous answer
arrives): their frames come a few ms after a tick ends, the first one starts a tick alone and the
others wait a whole tick, so the streams settle into groups on alternate ticks and each call is
half full. The policy here fills calls for both kinds:

**Start a tick when every expected stream has a frame, or at the deadline, whichever is first.**

* A stream is *waited for* only if it has no work now and its next frame is *expected* before the
  deadline: predicted from its own history, and not yet overdue (past its prediction by more than
  ``grace`` times that prediction's typical error, at least ``min_grace_s``). A stream that stopped
  sending, a one-shot job, or a stream with no history yet is never waited for — so a stream alone
  never waits (nothing else is expected), and idle streams cost nothing.
* The deadline is ``max_wait`` × the recent tick duration after the moment work became pending
  (the later of the last tick's end and the oldest pending frame's arrival): the engine never idles
  longer than that while it has work. A frame that misses a tick waits for the whole next one, so
  waiting up to half a tick for it to join costs the others less than it saves it.
* Two predictors per stream, and the one with the smaller recent error is used: *interval* (its last
  arrival + its mean frame interval: exact for open-loop clients) and *response* (its last output +
  its mean output-to-next-frame gap: exact for closed-loop clients, whatever the tick rate).

Fairness comes from the core, not from here: every tick takes one frame (the oldest pending) from
every stream that has one, whatever ``max_batch`` (more samples are split into several calls of the
same tick), so no stream starves and, under equal demand, every stream gets one frame per tick.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ditstream.engine.config import BatchConfig


def _mix(old: float | None, new: float, w: float) -> float:
    return new if old is None else old + w * (new - old)


@dataclass
class _History:
    """One stream's arrivals and outputs, and how well each predictor has done on it."""

    last_arrival: float | None = None
    interval: float | None = None
    interval_err: float | None = None
    last_output: float | None = None
    gap: float | None = None
    gap_err: float | None = None

    def by_interval(self) -> float | None:
        if self.last_arrival is None or self.interval is None:
            return None
        return self.last_arrival + self.interval

    def by_response(self) -> float | None:
        """Only while the last output is newer than the last arrival (the stream is answered)."""
        if self.last_output is None or self.gap is None:
            return None
        if self.last_arrival is not None and self.last_output < self.last_arrival:
            return None
        return self.last_output + self.gap


class BatchPolicy:
    """Decides, from observed arrivals, outputs and tick durations, how long to hold the next tick.

    Pure: no clock, no threads, no I/O. The core reports what happened (``observe_*``, with the
    times it saw) and asks ``wait_s(now, pending, idle)`` before each tick.
    """

    def __init__(self, config: BatchConfig | None = None) -> None:
        self.config = config or BatchConfig()
        self.tick_s: float | None = None
        self.last_tick_end: float | None = None
        self._streams: dict[str, _History] = {}

    # ------------------------------------------------------------------ observations
    def observe_arrival(self, stream_id: str, t: float) -> None:
        """A frame of ``stream_id`` that arrived at ``t`` was taken into a tick (in arrival order)."""
        h = self._streams.setdefault(stream_id, _History())
        w = self.config.smoothing
        p = h.by_interval()
        if p is not None:
            h.interval_err = _mix(h.interval_err, abs(t - p), w)
        p = h.by_response()
        if p is not None:
            h.gap_err = _mix(h.gap_err, abs(t - p), w)
        if h.last_output is not None and (h.last_arrival is None or h.last_output >= h.last_arrival) \
                and t >= h.last_output:
            h.gap = _mix(h.gap, t - h.last_output, w)
        if h.last_arrival is not None and t >= h.last_arrival:
            h.interval = _mix(h.interval, t - h.last_arrival, w)
        h.last_arrival = t

    def observe_output(self, stream_id: str, t: float) -> None:
        """An output of ``stream_id`` was emitted at ``t``."""
        self._streams.setdefault(stream_id, _History()).last_output = t

    def observe_tick(self, start: float, end: float) -> None:
        self.tick_s = _mix(self.tick_s, max(0.0, end - start), self.config.smoothing)
        self.last_tick_end = end

    def forget(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)

    # ------------------------------------------------------------------ decision
    def expected(self, stream_id: str) -> tuple[float, float] | None:
        """(predicted arrival of the stream's next frame, how late it may come), or None."""
        h = self._streams.get(stream_id)
        if h is None:
            return None
        options = [(p, err) for p, err in ((h.by_interval(), h.interval_err), (h.by_response(), h.gap_err))
                   if p is not None and err is not None]
        if not options:
            return None
        p, err = min(options, key=lambda o: o[1])
        return p, max(self.config.min_grace_s, self.config.grace * err)

    def deadline(self, pending: Mapping[str, float]) -> float | None:
        """When the next tick starts at the latest (None: at once — no pending work or no history)."""
        if not pending or self.tick_s is None or self.config.max_wait <= 0:
            return None
        since = min(pending.values())
        if self.last_tick_end is not None:
            since = max(since, self.last_tick_end)
        return since + self.config.max_wait * self.tick_s

    def wait_s(self, now: float, pending: Mapping[str, float], idle: Iterable[str]) -> float:
        """Seconds to hold the next tick (0: start it now); ask again whenever a frame arrives.

        ``pending``: stream id → when its work became ready (its oldest pending frame's arrival);
        ``idle``: live streams with no work at all (the only ones that may be waited for).
        """
        deadline = self.deadline(pending)
        if deadline is None or now >= deadline:
            return 0.0
        until = now
        for sid in idle:
            exp = self.expected(sid)
            if exp is None:
                continue
            p, grace = exp
            if p > deadline or now > p + grace:  # not soon enough, or overdue: not waited for
                continue
            until = max(until, p + grace)
        return max(0.0, min(deadline, until) - now)
