"""NDI in and out of ``ditstream client stream`` (issue 28), over loopback with the NDI runtime that
ndi-python's wheel carries (discovery with this machine's sources shown and ``extra_ips`` 127.0.0.1).

A synthetic NDI sender → ``client stream ndi:SRC --ndi-out OUT`` (a subprocess, as a user runs it)
on the demo model → a test receiver on OUT. The sender moves a red circle left to right one pixel a
frame; the receiver reads each output's colour and centroid (the demo's evaluator) and the seq in
its metadata: at least 90 % of the moving frames come back, in order, in the demo prompt's blue.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
from ditstream.clients.ndi import connect, ndi_lib, rgbx, source_matches, to_rgb, uyvy_to_rgb
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import read_image

from ditstream.bench.harness import ServerThread

#: The moving frames: the circle's centre x, one pixel a frame; before them (until the chain is
#: up) and after them the circle stands at the far left and far right.
MOVES = list(range(20, 44))
START_X, END_X = 10, 54
SEND_FPS = 6.0


def _circle(x: float) -> np.ndarray:
    return ds.render(ds.ShapeSpec("circle", "red", "white", float(x), 32.0, 10.0))


def _video(ndi: Any, rgb: np.ndarray) -> Any:
    frame = ndi.VideoFrameV2()
    frame.FourCC = ndi.FOURCC_VIDEO_TYPE_BGRX
    frame.data = np.ascontiguousarray(rgbx(rgb)[..., [2, 1, 0, 3]])
    return frame


class Sender(threading.Thread):
    """Sends the standing start frame until ``go``, then the moving frames, then the end frame."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.ndi = ndi_lib()
        options = self.ndi.SendCreate()
        options.ndi_name, options.clock_video = name, False
        self.sender = self.ndi.send_create(options)
        self.go, self.stop = threading.Event(), threading.Event()
        self.moved = 0

    def run(self) -> None:
        start, end = _video(self.ndi, _circle(START_X)), _video(self.ndi, _circle(END_X))
        moves = [_video(self.ndi, _circle(x)) for x in MOVES]
        next_t = time.monotonic()
        while not self.stop.is_set():
            if self.go.is_set() and self.moved < len(moves):
                frame, self.moved = moves[self.moved], self.moved + 1
            else:
                frame = end if self.moved else start
            self.ndi.send_send_video_v2(self.sender, frame)
            next_t += 1.0 / SEND_FPS
            self.stop.wait(max(0.0, next_t - time.monotonic()))
        self.ndi.send_destroy(self.sender)


class Receiver(threading.Thread):
    """Connects to ``name`` once it appears and keeps every frame: (seq from the metadata, RGB)."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name = name
        self.frames: list[tuple[int, np.ndarray]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        ndi = ndi_lib()
        try:
            receiver = connect(ndi, self.name, timeout_s=60.0)
        except BaseException as exc:
            self.error = exc
            return
        while not self.stop.is_set():
            kind, video, _, _ = ndi.recv_capture_v2(receiver, 100)
            if kind == ndi.FRAME_TYPE_VIDEO:
                seq = int(video.metadata.split('"')[1])
                self.frames.append((seq, to_rgb(ndi, video.FourCC, video.data)))
                ndi.recv_free_video_v2(receiver, video)
        ndi.recv_destroy(receiver)


def test_uyvy_from_ndi_converts_back_to_the_colours_sent() -> None:
    """Received as UYVY (NDI's own format) over loopback, a frame converts back to what was sent."""
    ndi = ndi_lib()
    name = f"ditstream-test-uyvy-{uuid.uuid4().hex[:8]}"
    options = ndi.SendCreate()
    options.ndi_name, options.clock_video = name, False
    sender = ndi.send_create(options)
    sent = np.zeros((32, 64, 3), np.uint8)
    sent[:, :16], sent[:, 16:32], sent[:, 32:48], sent[:, 48:] = (220, 40, 40), (40, 200, 60), (30, 60, 220), 245
    receiver = connect(ndi, name, color_format=ndi.RECV_COLOR_FORMAT_UYVY_BGRA)  # NDI's own format
    try:
        got = None
        for _ in range(50):
            ndi.send_send_video_v2(sender, _video(ndi, sent))
            kind, video, _, _ = ndi.recv_capture_v2(receiver, 100)
            if kind == ndi.FRAME_TYPE_VIDEO:
                assert video.FourCC == ndi.FOURCC_VIDEO_TYPE_UYVY
                got = (video.FourCC, to_rgb(ndi, video.FourCC, video.data))
                ndi.recv_free_video_v2(receiver, video)
                break
        assert got is not None, "no frame came back over loopback"
    finally:
        ndi.recv_destroy(receiver)
        ndi.send_destroy(sender)
    inner = (slice(4, -4), np.r_[4:12, 20:28, 36:44, 52:60])  # away from the codec's edges
    assert np.abs(got[1][inner].astype(int) - sent[inner]).max() <= 8, got[0]
    # and the UYVY path on its own, against BT.709 limited range written out by hand
    y, u, v = 16 + 219 / 255 * (0.2126 * 220 + 0.7152 * 40 + 0.0722 * 40), 110.0, 207.0
    uyvy = np.array([[[u, y], [v, y]]], np.float32).round().astype(np.uint8)
    assert np.abs(uyvy_to_rgb(uyvy).astype(int) - (220, 40, 40)).max() <= 3, uyvy_to_rgb(uyvy)
    assert source_matches("VM (OBS)", "OBS") and source_matches("VM (OBS)", "VM (OBS)")
    assert not source_matches("VM (OBS 2)", "OBS") and not source_matches("VM(OBS)", "OBS")


def test_ndi_in_through_the_demo_model_and_ndi_out(demo_stream_server: ServerThread) -> None:
    tag = uuid.uuid4().hex[:8]
    src, out = f"ditstream-test-src-{tag}", f"ditstream-test-out-{tag}"
    sender, receiver = Sender(src), Receiver(out)
    sender.start()
    receiver.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditstream", "client", "stream", f"ndi:{src}", "--ndi-out", out,
         "--url", demo_stream_server.url, "--fps", "30", "--seconds", str(3 + len(MOVES) / SEND_FPS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        started = time.monotonic()
        deadline = started + 60
        while not receiver.frames:  # the whole chain is up: the moving frames start
            assert proc.poll() is None and receiver.error is None, (receiver.error, proc.communicate()[1][-3000:])
            assert time.monotonic() < deadline, "no output reached the NDI receiver"
            time.sleep(0.05)
        sender.go.set()
        print(f"the moving frames start {time.monotonic() - started:.1f} s after the client process")
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        sender.stop.set()
        receiver.stop.set()
    sender.join(5)
    receiver.join(5)
    assert proc.returncode == 0, stderr[-3000:]
    assert sender.moved == len(MOVES), "the client ended before the sender was through"
    _check_frames(receiver.frames)


def _check_frames(frames: list[tuple[int, np.ndarray]]) -> None:
    seqs = [seq for seq, _ in frames]
    assert seqs == sorted(set(seqs)), "outputs out of order or repeated"
    readings = [read_image(rgb) for _, rgb in frames]
    xs = [r.centroid[0] if r.centroid else float("nan") for r in readings]
    phase = [0 if x < (START_X + MOVES[0]) / 2 else 2 if x > (MOVES[-1] + END_X) / 2 else 1 for x in xs]
    assert phase == sorted(phase), f"start, moving and end frames mixed: {np.round(xs, 1).tolist()}"
    moving = [x for x, p in zip(xs, phase) if p == 1]
    print(f"{len(frames)} outputs, {len(moving)} of {len(MOVES)} moving frames: {np.round(moving, 1).tolist()}")
    assert 0.9 * len(MOVES) <= len(moving) <= len(MOVES), np.round(xs, 1).tolist()
    assert all(b > a - 0.5 for a, b in itertools.pairwise(moving)), f"moving frames out of order: {moving}"
    assert moving[-1] - moving[0] > 0.8 * (MOVES[-1] - MOVES[0]), moving
    colours = [r.colour for r in readings]
    assert colours.count("blue") >= 0.9 * len(colours), colours  # the demo's default prompt, not the input's red


pytestmark = pytest.mark.timeout(180)
