"""How a worker settles a REST job in Redis: answer it exactly once, queue it again, or dead-letter it.

Stateless apart from its Redis client and the worker's counters: the jobs a worker holds are
``WorkerJobs``'; this object only writes their outcome.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ditstream.engine.errors import DitstreamError, EngineDeadError, GenerationError
from ditstream.engine.types import StreamOutput
from ditstream.server.scale.config import ScaleConfig, fields_get
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.messages import ErrorInfo, JobMessage, JobResult, encode_image

if TYPE_CHECKING:
    import redis
    from ditstream.server.scale.worker_jobs import WorkerJob

logger = logging.getLogger(__name__)

# KEYS: done, reply stream, jobs stream. ARGV: worker, done ttl, entry id, group, reply maxlen, m, img,
# reply ttl. Answer at most once (SET NX), then acknowledge and delete the entry whatever happened.
ANSWER_LUA = """
local first = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2]))
if first and KEYS[2] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[5]), '*', 'm', ARGV[6], 'img', ARGV[7])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8]))
end
if ARGV[3] ~= '' then
  pcall(redis.call, 'XACK', KEYS[3], ARGV[4], ARGV[3])
  redis.call('XDEL', KEYS[3], ARGV[3])
end
if first then return 1 else return 0 end
"""


#: Engine errors worth another attempt on another worker (anything else is the request's fault).
RETRYABLE = (GenerationError, EngineDeadError)


class JobAnswers:
    """Writes a job's outcome: the result (once, by ``ANSWER_LUA``), a retry, or a dead letter."""

    def __init__(self, r: redis.Redis, cfg: ScaleConfig, worker_id: str, counters: Counters) -> None:
        self.r = r
        self.cfg = cfg
        self.keys = cfg.keys
        self.id = worker_id
        self.counters = counters
        self._answer = r.register_script(ANSWER_LUA)

    def finish(self, job: WorkerJob) -> None:
        """Settle a job the engine finished (or that was cancelled)."""
        if job.future.cancelled():  # reaped: nobody waits for it (see ``WorkerJobs.reap_orphans``)
            self.ack(job.entry)
            return
        exc = job.future.exception()
        if exc is None:
            out: StreamOutput = job.future.result()
            self.counters.add("jobs_done")
            self.counters.add("inference_s", out.timings.get("inference", 0.0))
            self.reply(job.entry, job.msg, out, None)
        elif isinstance(exc, RETRYABLE) and job.attempts < self.cfg.max_attempts and time.time() < job.msg.deadline:
            self.counters.add("jobs_retried")
            logger.warning("worker %s: job %s failed (%s); queued again (attempt %d)", self.id, job.msg.job,
                           exc, job.attempts + 1)
            self._requeue(job)
        else:
            self.counters.add("jobs_failed")
            if isinstance(exc, RETRYABLE):
                self.dead_letter(job.entry, {"m": job.msg.dump()}, f"failed {job.attempts} times: {exc}", job.msg,
                                 last=exc)
            else:
                self.reply(job.entry, job.msg, None, exc)

    def _requeue(self, job: WorkerJob) -> None:
        retry_msg = job.msg.model_copy(update={"attempt": job.attempts + 1})
        fields = {"m": retry_msg.dump()}
        img = self.r.xrange(self.keys.jobs, job.entry, job.entry)
        if img:
            fields["img"] = fields_get(img[0][1], "img") or b""
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.keys.jobs, fields)
        pipe.xack(self.keys.jobs, self.keys.group, job.entry)
        pipe.xdel(self.keys.jobs, job.entry)
        pipe.execute()

    def reply(self, eid: str, msg: JobMessage, out: StreamOutput | None, exc: BaseException | None) -> bool:
        """Answer ``msg`` unless someone already did; True if this was the first answer."""
        # Coded as the REST response will send it (the gateway relays these bytes), else raw.
        meta, data = (encode_image(out.image, msg.output_format or "raw", msg.output_quality)
                      if out is not None else (None, b""))
        result = JobResult(job=msg.job, worker=self.id, image=meta, error=ErrorInfo.of(exc) if exc else None,
                           skipped=bool(out.skipped) if out else False, timings=dict(out.timings) if out else {})
        first = self._answer(keys=[self.keys.done(msg.job), msg.reply_to, self.keys.jobs],
                             args=[self.id, self.cfg.done_ttl_s, eid, self.keys.group, self.cfg.replies_len,
                                   result.dump(), data, self.cfg.replies_ttl_s])
        if not first:
            self.counters.add("jobs_duplicate")
            logger.info("worker %s: job %s (entry %s) was already answered; result discarded", self.id, msg.job,
                        eid)
        else:  # one line per answer written: the chaos test counts answers per job from these
            logger.debug("worker %s: job %s (entry %s) answered", self.id, msg.job, eid)
        return bool(first)

    def ack(self, eid: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self.keys.jobs, self.keys.group, eid)
        pipe.xdel(self.keys.jobs, eid)
        pipe.execute()

    def dead_letter(self, eid: str, fields: dict[Any, Any], reason: str, msg: JobMessage | None,
                    last: DitstreamError | None = None) -> None:
        """Park a job that keeps failing (with its reason) and tell the waiting gateway, once: with the
        class and details of its ``last`` error, so the client gets that error's status and code."""
        self.counters.add("jobs_dead_lettered")
        logger.error("worker %s: job entry %s to the dead-letter stream: %s", self.id, eid, reason)
        entry = {"m": fields_get(fields, "m") or b"", "reason": reason, "worker": self.id, "entry": eid}
        self.r.xadd(self.keys.dead_letter, entry, maxlen=self.cfg.dead_letter_len, approximate=True)
        if msg is not None:
            error = (type(last)(f"job {msg.job} {reason}", **last.details()) if last is not None
                     else GenerationError(f"job {msg.job} {reason}"))
            self.reply(eid, msg, None, error)
        else:
            self.ack(eid)
