"""The output half of a live stream's session: the engine's notify, the per-stream encoder in the codec
pool, and the one sender task that writes to the socket; a mixin of ``ws.StreamSession``."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import (
    DitstreamError,
    EngineDeadError,
    GenerationError,
)
from ditstream.engine.types import StreamOutput
from ditstream.server import codec
from ditstream.server.errors import (
    WS_INTERNAL_ERROR,
    ws_error,
)
from ditstream.server.live.protocol import (
    pack_frame,
)
from ditstream.server.live.session_util import MAX_PENDING_CONTROL, ms
from fastapi import WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

logger = logging.getLogger(__name__)


class SessionOutputs:
    """Encoding and sending of ``StreamSession`` (which holds the state)."""

    def _notify(self) -> None:
        """Engine thread, after each output: start (or re-arm) this stream's encoder in the codec pool.

        Encoding straight from here, instead of waking the event loop first, takes one thread hop
        off every frame's path. At most one encoder runs per stream, so outputs stay in order.
        When every queued output is already the JPEG the client wants (a gateway relaying its
        worker's bytes), the "encoder" only hands them on: it runs right here, on the notifying
        thread, saving the pool hop too. Must never raise: it runs on the engine (or reader) thread.
        """
        try:
            with self._encode_lock:
                if self._encode_scheduled:
                    self._encode_again = True
                    return
                self._encode_scheduled = True
            if self._relay is not None and self._all_relayed():
                self._encode_pending()
            else:
                self.state.codec.pool.submit(self._encode_pending)
        except Exception:  # pool shut down at exit
            logger.debug("encoder not scheduled", exc_info=True)
            with self._encode_lock:
                self._encode_scheduled = False
            self._wake_loop()

    def _all_relayed(self) -> bool:
        """Every queued output needs no codec work: coded at the client's quality, or an in-band error."""
        handle, quality = self.handle, self.quality
        return handle is not None and all(
            out.error is not None or (out.encoded is not None and out.encoded.quality == quality)
            for out in handle.outputs.peek())

    def _wake_loop(self) -> None:
        self._call_loop(self.wake.set)

    def _encode_pending(self) -> None:
        """Codec thread: encode every queued output in order, hand them to the sender."""
        try:
            while True:
                handle = self.handle
                batch = handle.outputs.drain() if handle is not None else []
                for out in batch:
                    t0 = time.perf_counter()
                    quality = self.quality
                    if out.error is not None:  # the model call failed: an in-band error, in the frame's place
                        data = None
                    elif out.encoded is not None and out.encoded.quality == quality:
                        data = out.encoded.data  # a worker's JPEG at the client's quality: relayed as it is
                    elif out.encoded is not None:  # coded before a quality change: once more, at the new one
                        image = out.image if out.image is not None else codec.decode(
                            out.encoded.data, max_pixels=self.settings.max_pixels)
                        data = codec.encode(image, "jpeg", quality)
                    elif out.image is self._last_image and quality == self._last_quality:
                        data = self._last_bytes  # a skipped frame re-sends the same array
                    else:
                        data = codec.encode(out.image, "jpeg", quality)
                        self._last_image, self._last_bytes, self._last_quality = out.image, data, quality
                    if len(self.encoded) >= self.encoded_limit:  # the client reads too slowly: drop oldest
                        self.encoded.popleft()
                        self.metrics.frames.labels("dropped").inc()
                    self.encoded.append((out, data, time.perf_counter() - t0))
                if batch:
                    self._wake_loop()
                with self._encode_lock:
                    if not self._encode_again:
                        self._encode_scheduled = False
                        break
                    self._encode_again = False
            if handle is not None and handle.outputs.closed:
                self._wake_loop()  # after the flag is down, so the sender sees a settled state
        except Exception:
            logger.exception("encoding failed")
            with self._encode_lock:
                self._encode_scheduled = False
            self._wake_loop()

    def send_json(self, message: dict[str, Any]) -> None:
        if len(self.control_out) >= MAX_PENDING_CONTROL:
            self.request_close(1008, "client does not read")
            return
        self.control_out.append(json.dumps(message, separators=(",", ":")))
        self.wake.set()

    async def _sender(self) -> None:
        """The only writer to the socket: control replies, then output frames, then a close."""
        try:
            await self._send_loop()
        except (WebSocketDisconnect, ClientDisconnected, RuntimeError) as exc:  # the client left mid-send
            logger.debug("sender stopped: %r", exc)

    async def _send_loop(self) -> None:
        assert self.handle is not None
        outputs = self.handle.outputs
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.control_out:
                await self.ws.send_text(self.control_out.popleft())
            if self.close_code is not None:
                await self._close()
                return
            self._count_output_drops()
            while self.encoded:
                await self._send_output(*self.encoded.popleft())
            if outputs.closed and not outputs and not self.encoded and not self._encode_scheduled:
                err = self.runner.error
                if err is not None or not self.runner.alive:
                    dead = EngineDeadError(f"the engine stopped: {err!r}" if err else "the engine stopped")
                    await self.ws.send_text(json.dumps(ws_error(dead)))
                    self.close_code, self.close_reason = WS_INTERNAL_ERROR, dead.error_type
                    await self._close()
                    return

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(self.close_code or 1000, self.close_reason[:120])

    def _count_output_drops(self) -> None:
        assert self.handle is not None
        dropped = self.handle.outputs.dropped
        if dropped > self._out_dropped:
            self.metrics.frames.labels("dropped").inc(dropped - self._out_dropped)
            self._out_dropped = dropped

    async def _send_output(self, out: StreamOutput, data: bytes | None, encode_s: float) -> None:
        if data is None:  # its model call failed: in-band error naming the frame; the stream goes on
            self._untrack(out.seq)
            err = out.error if isinstance(out.error, DitstreamError) else GenerationError(str(out.error))
            await self.ws.send_text(json.dumps({**ws_error(err), "seq": out.seq, "ts": out.ts},
                                               separators=(",", ":")))
            self.metrics.frames.labels("failed").inc()
            return
        t_recv = self.received.pop(out.seq, None)
        decode_s = self.decode_s.pop(out.seq, 0.0)
        now = time.perf_counter()
        server_s = (now - t_recv) if t_recv is not None else out.timings.get("total", 0.0) + encode_s
        inference_s = out.timings.get("inference", 0.0)
        header = {"seq": out.seq, "ts": out.ts, "skipped": out.skipped,
                  "width": out.encoded.width if out.encoded else int(out.image.shape[1]),
                  "height": out.encoded.height if out.encoded else int(out.image.shape[0]),
                  "timings": {"decode_ms": ms(decode_s), "queue_ms": ms(out.timings.get("queue", 0.0)),
                              "inference_ms": ms(inference_s), "encode_ms": ms(encode_s),
                              "server_ms": ms(server_s)}}
        await self.ws.send_bytes(pack_frame(header, data))
        m = self.metrics
        m.frames.labels("skipped" if out.skipped else "processed").inc()
        m.queue_seconds.observe(out.timings.get("queue", 0.0))
        if not out.skipped:
            m.inference_seconds.observe(inference_s)
        m.e2e_seconds.observe(server_s)
        m.overhead_seconds.observe(max(0.0, server_s - inference_s))

    def _config_dict(self, cfg: StreamConfig) -> dict[str, Any]:
        d = cfg.to_dict()
        d["fps"] = self.fps
        d["quality"] = self.quality
        return d

    def _limits(self) -> dict[str, Any]:
        s = self.settings
        return {"max_frame_bytes": s.max_frame_bytes, "max_control_bytes": s.max_control_bytes,
                "max_pixels": s.max_pixels, "max_prompt_chars": s.max_prompt_chars,
                "size_multiple": self.runner.info.get("size_multiple"), "max_fps": s.max_fps,
                "steps": [1, 4], "output_queue": self.runner.engine_config.output_queue_size,
                "input_formats": list(codec.FORMATS), "output_format": "jpeg"}

