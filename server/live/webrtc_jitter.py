"""A video frame is complete at its last packet, not one frame later.

aiortc's receiver reassembles a video frame in its ``JitterBuffer`` and hands it to the decoder
only when the first packet of the *next* frame arrives (a new RTP timestamp): every received frame
waits one frame interval — 33 ms at 30 fps — before it is even decoded. Senders mark the last
packet of each video frame (the RTP marker bit; RFC 7741 makes it mandatory for VP8, RFC 6184 for
H.264; browsers and aiortc set it), which is what browsers' receivers go by. ``FrameEndJitterBuffer``
emits a frame as soon as its packets from the buffer's start up to a marked one are all there; a
frame whose marked packet was lost still completes the old way, at the next frame's first packet.

It replaces the receiver's buffer through aiortc's private attribute (``use_frame_end_marker``):
aiortc is locked, and ``tests/test_webrtc.py`` checks that the buffer is in place on a WHIP session
and that it completes a frame at its marked packet, so an upgrade that moves the attribute fails a
test instead of silently bringing the 33 ms back.
"""

from __future__ import annotations

import logging
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame

logger = logging.getLogger(__name__)

#: aiortc's own size for a video receiver's buffer (packets).
VIDEO_CAPACITY = 512
_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"


class FrameEndJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, completing a frame at its marked last packet."""

    def __init__(self, capacity: int = VIDEO_CAPACITY) -> None:
        super().__init__(capacity=capacity, is_video=True)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        timestamp = None
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]  # type: ignore[operator]
            if packet is None:
                break  # a gap: wait for the missing packet (or for the parent's rules)
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                break  # the frame ended without its marked packet: the parent's rule completes it
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)  # type: ignore[attr-defined]
        return super()._remove_frame(sequence_number)


def use_frame_end_marker(pc: Any) -> int:
    """Give every video receiver of ``pc`` a ``FrameEndJitterBuffer`` (call after the remote
    description is applied, before media flows); returns how many receivers got one."""
    n = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "video" or receiver is None:
            continue
        if not hasattr(receiver, _ATTRIBUTE):
            logger.warning("aiortc's receiver has no %s: video frames wait one frame interval more", _ATTRIBUTE)
            continue
        setattr(receiver, _ATTRIBUTE, FrameEndJitterBuffer())
        n += 1
    return n
