"""What a worker keeps per job and per session, and the Lua script that answers a job exactly once."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ditstream.engine.errors import EngineDeadError, GenerationError
from ditstream.engine.runner import StreamHandle
from ditstream.server.scale.messages import (
    JobMessage,
)

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


@dataclass
class WorkerJob:
    entry: str
    msg: JobMessage
    future: Future
    started: float
    attempts: int


@dataclass
class WorkerSession:
    sid: str
    handle: StreamHandle
    epoch: int
    reply_to: str
    last_in: str = "0-0"
    #: JPEG quality of its outputs, as its client asked (0: ``jpeg_quality``).
    quality: int = 0
    config: dict[str, Any] = field(default_factory=dict)

