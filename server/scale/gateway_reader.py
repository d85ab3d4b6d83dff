"""The gateway's reader: the one thread that reads what workers send back.

One ``XREAD`` over this gateway's reply stream (job results, control replies) and every session's
output stream; it resolves job and control futures and puts each output in its handle's
``OutputQueue`` (a JPEG the client will get as it is stays coded: checked, never decoded).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ditstream.engine.imagefile import check_header
from ditstream.engine.types import EncodedImage, StreamOutput
from ditstream.server.scale.config import Backoff, conn_errors, fields_get, sid_str
from ditstream.server.scale.counters import Counters
from ditstream.server.scale.gateway_stream import GatewayStreamHandle
from ditstream.server.scale.messages import (
    JobResult,
    Keys,
    OutputHeader,
    WireError,
    decode_image,
    load_reply,
)

if TYPE_CHECKING:
    import redis
    from ditstream.server.scale.gateway_jobs import GatewayJobs
    from ditstream.server.scale.gateway_sessions import GatewaySessions

logger = logging.getLogger(__name__)


class Reader:
    """Reads replies and outputs; hands results to ``jobs``, control replies and outputs to ``sessions``."""

    def __init__(self, r: redis.Redis, keys: Keys, gateway_id: str, replies: str, jobs: GatewayJobs,
                 sessions: GatewaySessions, counters: Counters, stop: threading.Event, *, max_pixels: int) -> None:
        self.r = r
        self.keys = keys
        self.id = gateway_id
        self.replies = replies
        self.jobs = jobs
        self.sessions = sessions
        self.counters = counters
        self.max_pixels = max_pixels
        self._stop = stop

    def loop(self) -> None:
        backoff = Backoff(f"gateway {self.id} reader", self._stop)
        last_reply = "0-0"  # the stream is this gateway's own (a fresh id), so read it all
        while not self._stop.is_set():
            handles = {self.keys.frames_out(h.id): h for h in self.sessions.handles()}
            streams = {self.replies: last_reply, **{k: h.last_out for k, h in handles.items()}}
            try:
                resp = self.r.xread(streams, block=500)
                backoff.ok()
            except conn_errors() as exc:
                backoff.failed(exc)
                continue
            read: dict[str, list[str]] = {}
            for key, entries in resp or ():
                name = sid_str(key)
                for entry_id, fields in entries:
                    eid = sid_str(entry_id)
                    try:
                        if name == self.replies:
                            read.setdefault(name, []).append(eid)
                            last_reply = eid
                            self._on_reply(fields)
                        elif name in handles:
                            handles[name].last_out = eid
                            self._on_output(handles[name], fields)
                    except Exception as exc:
                        logger.error("gateway %s: unreadable entry %s on %s: %s", self.id, eid, name, exc)
            if read:
                self._delete_read(read)

    def _delete_read(self, read: dict[str, list[str]]) -> None:
        """A reply (a raw result, up to megabytes) is deleted once read: the reply stream holds only what
        is unread. Outputs are not: a session's output stream is capped at ``frames_out_len`` coded
        frames by the worker's XADD and expires with the session, and an XDEL per frame cost the
        gateway ~0.1 ms of CPU per frame (``bench gateway``, docs/benchmarks.md)."""
        pipe = self.r.pipeline(transaction=False)
        for name, ids in read.items():
            pipe.xdel(name, *ids)
        try:
            pipe.execute()
        except conn_errors():
            pass  # Redis went away: it took the entries with it

    def _on_reply(self, fields: dict[Any, Any]) -> None:
        raw = fields_get(fields, "m") or b"{}"
        if raw == b"{}":
            return
        reply = load_reply(raw)  # typed by its ``kind`` field
        if isinstance(reply, JobResult):
            self.jobs.on_result(reply, fields_get(fields, "img") or b"")
        else:
            self.sessions.on_session_reply(reply)

    def _on_output(self, handle: GatewayStreamHandle, fields: dict[Any, Any]) -> None:
        head = OutputHeader.load(fields_get(fields, "m") or b"")
        if head.refused and head.error is not None and head.epoch == handle.epoch:  # outside the output order
            handle.outputs.put(StreamOutput(stream_id=handle.id, seq=head.seq, ts=head.ts, image=None,
                                            error=head.error.to_exception()))
            return
        if (head.epoch != handle.epoch or (head.worker and head.worker != handle.worker)
                or head.seq <= handle.last_seq_out):
            # From a worker the session moved away from, or a frame already answered: outputs leave in
            # seq order, so a seq at or below the last delivered one is a repeat — e.g. a frame re-sent
            # after a Redis restart and answered again by the same worker under the same epoch.
            self.counters.add("outputs_stale")
            return
        handle.last_seq_out = head.seq
        error = head.error.to_exception() if head.error is not None else None
        image = encoded = None
        if error is not None:  # the worker's model call failed: relayed as the in-band error for this seq
            handle.stats.failed += 1
        else:
            if head.image is None:
                raise WireError(f"output {head.seq} has neither an image nor an error")
            data = fields_get(fields, "img") or b""
            if handle.relay_encoded and head.image.codec == "jpeg":  # checked, never decoded: relayed
                m = head.image
                check_header(data, max_pixels=self.max_pixels, size=(m.width, m.height))
                encoded = EncodedImage(data, m.width, m.height, m.quality)
            else:
                image = decode_image(head.image, data, max_pixels=self.max_pixels)
            if head.skipped:
                handle.stats.skipped += 1
            else:
                handle.stats.processed += 1
        before = handle.outputs.dropped
        handle.outputs.put(StreamOutput(stream_id=handle.id, seq=head.seq, ts=head.ts, image=image,
                                        skipped=head.skipped, timings=dict(head.timings), error=error,
                                        encoded=encoded))
        handle.stats.dropped_outputs += handle.outputs.dropped - before
        self.counters.add("frames_received")
