"""What the scale-out fault tests judge a fleet by, shared by the chaos and rolling-update tests.

``FrameLog`` keeps every output one stream received and reports duplicates, order, foreign images
and the longest wait around a fault; ``Stream`` is one session of an in-process gateway feeding it.
``judge_workers`` reads the workers' own logs (a line per job answer) to tell, independently of the
gateway, which jobs were computed or answered more than once.
"""

from __future__ import annotations

import datetime
import itertools
import re
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from ditstream.engine.config import StreamConfig
from ditstream.server.scale.gateway import RedisGatewayRunner

from ditstream.bench.scale_harness import WorkerProcess

#: Side of the frames ``FrameLog`` draws.
SIZE = 32

#: Frame identity. Red names the stream; the seq is written as four base-8 digits (seq mod 8**4),
#: one per 16×16 quadrant, in green steps of ``SHADE_STEP``: more than twice ``TOLERANCE`` (what the
#: JPEG round trips may move a shade; measured ≤ 6 at the quadrant centres), so a frame one seq away
#: differs by a full step in at least one quadrant and can never pass for its neighbour.
TOLERANCE, SHADE_STEP, DIGITS, HALF = 12, 30, 4, SIZE // 2
QUADRANTS = [(0, 0), (0, HALF), (HALF, 0), (HALF, HALF)]


def shades(seq: int) -> list[int]:
    return [15 + SHADE_STEP * ((seq // 8**i) % 8) for i in range(DIGITS)]


class FrameLog:
    """The outputs one stream received, judged over its whole history (before, across and after a
    fault): each frame's red names the stream, its green quadrants its seq (see ``QUADRANTS``)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.red = 30 + 60 * k
        self.got: list[tuple[float, int, bool]] = []  # (arrival, seq, the image is this stream's frame seq)

    def frame(self, seq: int) -> np.ndarray:
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        img[..., 0] = self.red
        for (y, x), shade in zip(QUADRANTS, shades(seq)):
            img[y:y + HALF, x:x + HALF, 1] = shade
        return img

    def is_frame(self, seq: int, image: np.ndarray) -> bool:
        """Whether ``image`` is this stream's frame ``seq`` (within the codec's tolerance)."""
        for (y, x), shade in zip(QUADRANTS, shades(seq)):
            r, g = (int(v) for v in image[y + HALF // 2, x + HALF // 2, :2])
            if abs(r - self.red) > TOLERANCE or abs(g - shade) > TOLERANCE:
                return False
        return True

    def record(self, seq: int, image: np.ndarray) -> None:
        self.got.append((time.monotonic(), seq, self.is_frame(seq, image)))

    def since(self, t: float) -> int:
        return sum(1 for g in self.got if g[0] > t)

    def report(self, since: float, until: float) -> dict[str, float]:
        """Duplicates, order and identity over every output up to ``until``; the gap from ``since``
        (the fault) on, the first gap running from the fault itself."""
        history = [g for g in self.got if g[0] <= until]
        seqs = [s for _t, s, _own in history]
        times = [since] + [t for t, _s, _own in history if t >= since]
        return {
            "outputs": len(times) - 1,
            "history": len(history),
            "duplicated": len(seqs) - len(set(seqs)),
            "out_of_order": sum(1 for a, b in itertools.pairwise(seqs) if b < a),
            "foreign": sum(1 for _t, _s, own in history if not own),
            "longest_gap_s": max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else until - since,
        }


class Stream:
    """One session of an in-process gateway, fed ``log``'s frames every ``period_s``; what comes out is
    recorded in ``log``. ``cfg`` defaults to a plain one at ``FrameLog``'s size."""

    def __init__(self, gw: RedisGatewayRunner, log: FrameLog, cfg: StreamConfig | None = None,
                 period_s: float = 0.02) -> None:
        self.log = log
        self.period_s = period_s
        self.h = gw.add_stream(cfg or StreamConfig(prompt="p", width=SIZE, height=SIZE))
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._feed, daemon=True),
                        threading.Thread(target=self._drain, daemon=True)]
        for t in self.threads:
            t.start()

    def _feed(self) -> None:
        seq = 0
        while not self.stop.is_set():
            self.h.submit(self.log.frame(seq), seq, float(seq))
            seq += 1
            self.stop.wait(self.period_s)

    def _drain(self) -> None:
        while not self.stop.is_set():
            out = self.h.outputs.get(timeout=0.2)
            if out is not None and out.image is not None:
                self.log.record(out.seq, out.image)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.h.close()


_ANSWER_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*: worker (\S+): job (\S+) \(entry (\S+)\) "
                          r"(answered|was already answered; result discarded)$")


class Result(NamedTuple):
    """One result a worker computed and offered as a job's answer, from its log line."""
    t: float  # wall clock
    worker: str
    entry: str  # the job's stream entry: a job sent again after a Redis restart is a new entry
    written: bool  # written as the answer, or refused because the job was already answered
    line: str


def worker_results(logs: list[Path]) -> dict[str, list[Result]]:
    """From the workers' own logs (the killed one's included: lines are written as they happen):
    for each job, every result a worker computed and offered as its answer."""
    results: dict[str, list[Result]] = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = _ANSWER_LINE.match(line)
            if m:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                results.setdefault(m.group(3), []).append(
                    Result(t, m.group(2), m.group(4), m.group(5) == "answered", line))
    return results


def answered_twice(times: dict[str, list[float]], outage: tuple[float, float] | None = None) -> list[str]:
    """Jobs answered more than once within one Redis lifetime. Across a Redis restart (``outage``:
    wall clock before it began, after it ended) a job may have one answer in each lifetime: an
    answer written just before the data was lost may never reach the gateway, which then sends
    the job again."""
    slack = 0.01  # log lines carry milliseconds
    twice = []
    for job, ts in sorted(times.items()):
        ts = sorted(ts)
        straddles = (outage is not None and len(ts) == 2
                     and ts[0] <= outage[1] + slack and ts[1] >= outage[0] - slack)
        if len(ts) > 1 and not straddles:
            twice.append(job)
    return twice


def judge_workers(workers: list[WorkerProcess], victim: str | None = None,
                   outage: tuple[float, float] | None = None) -> dict[str, Any]:
    """What the workers themselves say they did, independent of the gateway's counters: jobs
    answered, results computed, the jobs answered twice within one Redis lifetime, and the job
    entries computed twice. An entry is delivered to one worker, and taken by another only when
    its holder is dead: so apart from the killed worker's computations (a survivor runs again
    what it held) no entry may be computed twice. A job held at a Redis restart is computed
    twice, legitimately: the gateway sends it again, as a new entry, while the old one runs."""
    results = worker_results([w.log for w in workers if w.log is not None])
    per_entry: dict[tuple[str, str], list[Result]] = {}
    for job, rs in results.items():
        for r in rs:
            if r.worker != victim:
                per_entry.setdefault((job, r.entry), []).append(r)
    twice = {k: rs for k, rs in per_entry.items() if len(rs) > 1}
    return {
        "answered": sum(1 for rs in results.values() if any(r.written for r in rs)),
        "computed": sum(len(rs) for rs in results.values()),
        "answered_twice": answered_twice({j: [r.t for r in rs if r.written] for j, rs in results.items()}, outage),
        "jobs_computed_twice": sorted(j for j, rs in results.items() if sum(r.worker != victim for r in rs) > 1),
        "computed_twice": [f"{job} entry {entry}: " + " | ".join(r.line for r in rs)
                           for (job, entry), rs in sorted(twice.items())],
    }
