"""REST jobs through the gateway: each pending job's future, until its one answer arrives.

``submit`` only queues (the publisher sends, then notes each job's stream entry with ``mark_sent``);
``on_result`` runs on the reader thread; ``expire``, ``sent_entries`` and ``resend`` on the supervisor's. The pending table and the recent answers are this object's
own, under its lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import GenerationError
from ditstream.engine.imagefile import check_header
from ditstream.engine.limits import check_input
from ditstream.engine.types import EncodedImage, StreamOutput
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.gateway_publisher import Outbox
from ditstream.server.scale.messages import JobMessage, JobResult, config_to_wire, decode_image, encode_image

logger = logging.getLogger(__name__)

#: Results kept after their future resolved, to recognise (and count) a second answer.
RECENT_RESULTS = 4096


@dataclass
class PendingJob:
    msg: JobMessage
    image: bytes
    future: Future
    #: Its entry in the jobs stream, once the publisher sent it (None while queued or being sent again).
    entry: str | None = None


class GatewayJobs:
    """The gateway's pending REST jobs and the workers that answered the recent ones."""

    def __init__(self, gateway_id: str, replies: str, outbox: Outbox, counters: Counters, *,
                 job_timeout_s: float, max_pixels: int) -> None:
        self.id = gateway_id
        self.replies = replies
        self.outbox = outbox
        self.counters = counters
        self.job_timeout_s = job_timeout_s
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._jobs: dict[str, PendingJob] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()  # job -> worker that answered

    def count(self) -> int:
        return len(self._jobs)

    def get(self, job: str) -> PendingJob | None:
        with self._lock:
            return self._jobs.get(job)

    def answered_by(self) -> dict[str, str]:
        """The recently answered jobs and the worker that answered each (oldest first)."""
        with self._lock:
            return dict(self._recent)

    def submit(self, cfg: StreamConfig, image: np.ndarray | None = None,
               encode: tuple[str, int] | None = None) -> Future:
        """Queue one validated job for the publisher; the future yields a ``StreamOutput``."""
        check_input(cfg, image)
        meta, data = encode_image(image, "raw") if image is not None else (None, b"")
        coding = {"output_format": encode[0], "output_quality": encode[1]} if encode is not None else {}
        msg = JobMessage(reply_to=self.replies, gateway=self.id, config=config_to_wire(cfg), image=meta,
                         deadline=time.time() + self.job_timeout_s, **coding)
        future: Future = Future()
        with self._lock:
            self._jobs[msg.job] = PendingJob(msg, data, future)
        future.add_done_callback(lambda f: self._job_done(msg.job, f))
        self.outbox.put("job", msg.job)
        return future

    def _job_done(self, job: str, future: Future) -> None:
        with self._lock:
            self._jobs.pop(job, None)
        if future.cancelled():  # the client left: mark it answered so no worker starts it
            self.outbox.put("cancel", job)

    def on_result(self, res: JobResult, img: bytes) -> None:
        """A worker's answer (reader thread): resolve the job's future, count a second answer."""
        with self._lock:
            pending = self._jobs.pop(res.job, None)
            if pending is None:
                if res.job in self._recent:
                    self.counters.add("duplicate_answers")
                    logger.error("job %s answered twice (%s, then %s)", res.job, self._recent[res.job], res.worker)
                return
            self._recent[res.job] = res.worker
            while len(self._recent) > RECENT_RESULTS:
                self._recent.popitem(last=False)
        fut = pending.future
        if fut.done():
            return
        if res.error is not None:
            self.counters.add("jobs_failed")
            fut.set_exception(res.error.to_exception())
            return
        image, encoded = None, None
        try:
            if res.image is not None and res.image.codec != "raw":  # coded by the worker: relayed as it is
                fmt, w, h = check_header(img, max_pixels=self.max_pixels, size=(res.image.width, res.image.height))
                encoded = EncodedImage(img, w, h, res.image.quality, format=fmt)
            elif res.image is not None:
                image = decode_image(res.image, img, max_pixels=self.max_pixels)
        except Exception as exc:
            fut.set_exception(GenerationError(f"unreadable result from {res.worker}: {exc}"))
            return
        self.counters.add("jobs_answered")
        fut.set_result(StreamOutput(stream_id=res.job, seq=0, ts=0.0, image=image, skipped=res.skipped,
                                    timings=dict(res.timings), encoded=encoded))

    def mark_sent(self, job: str, entry: str) -> None:
        """The publisher wrote ``job`` to the jobs stream as ``entry`` (publisher thread)."""
        with self._lock:
            pending = self._jobs.get(job)
            if pending is not None:
                pending.entry = entry

    def sent_entries(self) -> dict[str, str]:
        """Each pending job that was sent, and its stream entry."""
        with self._lock:
            return {job: p.entry for job, p in self._jobs.items() if p.entry is not None}

    def resend(self, jobs: list[str]) -> int:
        """Queue ``jobs`` again (Redis lost their entries: a restart, or a failover to a replica that
        lagged); returns how many were still pending."""
        n = 0
        with self._lock:
            for job in jobs:
                pending = self._jobs.get(job)
                if pending is not None:
                    pending.entry = None
                    n += 1
                    self.outbox.put("job", job)
        self.counters.add("jobs_resent", n)
        return n

    def expire(self) -> None:
        """Fail the jobs past their deadline (no worker answered in time)."""
        now = time.time()
        with self._lock:
            late = [j for j in self._jobs.values() if now > j.msg.deadline + 1.0]
        for j in late:
            self.counters.add("jobs_expired")
            if not j.future.done():
                j.future.set_exception(GenerationError(f"no result within the {self.job_timeout_s:.0f} s deadline"))

    def fail_all(self, err: BaseException) -> None:
        """The gateway stops: every waiting client gets ``err``."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)
