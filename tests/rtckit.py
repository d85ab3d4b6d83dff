"""A synthetic WebRTC camera for the WHIP/WHEP tests (aiortc and av are test dependencies)."""

from __future__ import annotations

import av
import numpy as np
from aiortc import VideoStreamTrack


class Source(VideoStreamTrack):
    """A synthetic camera at aiortc's own pace (30 fps) showing ``image`` (switchable)."""

    def __init__(self, image: np.ndarray) -> None:
        super().__init__()
        self.image = image

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.image, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame
