"""The webcam capture path (OpenCV), exercised with a video file through the same code, end to end.

No camera exists on a test machine; ``capture_frames`` is the one function that reads a camera index
or a file, so a file proves the reading, fitting, streaming and writing a webcam user gets.
"""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from ditstream.clients import media
from ditstream.clients.media import SourceError, capture_frames, open_source
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings

from ditstream.bench.harness import ServerThread

N = 9


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An MJPG .avi of N frames, 80×60, each a different grey with a white square moving right."""
    path = tmp_path_factory.mktemp("clip") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 60))
    assert writer.isOpened()
    for i in range(N):
        img = np.full((60, 80, 3), 20 + i * 20, np.uint8)
        img[20:40, 5 * i : 5 * i + 20] = 255
        writer.write(img)
    writer.release()
    return path


@pytest.fixture(scope="module")
def server():
    with ServerThread(create_app(Settings(model="null", default_width=64, default_height=48), null_runner())) as srv:
        yield srv


def test_capture_frames_reads_a_file_as_it_reads_a_camera(clip):
    frames = list(capture_frames(str(clip)))
    assert len(frames) == N and frames[0].shape == (60, 80, 3)
    greys = [int(f[5, 75].mean()) for f in frames]  # a corner the square never reaches
    assert greys == sorted(greys) and greys[-1] - greys[0] > 100, greys
    fitted = list(open_source(str(clip), 64, 48, loop=False))
    assert len(fitted) == N and fitted[0].shape == (48, 64, 3)


def test_a_missing_camera_or_opencv_is_one_clear_error(monkeypatch):
    with pytest.raises(SourceError, match="cannot open camera 7"):
        capture_frames(7)
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if the webcam extra were not installed
    with pytest.raises(SourceError, match=r"ditstream\[webcam\]"):
        open_source("webcam", 64, 48)
    assert "ditstream[webcam]" in media.WEBCAM_EXTRA


def test_cli_streams_a_video_file_into_a_video_file(clip, server, tmp_path):
    out = tmp_path / "out.avi"
    r = subprocess.run([sys.executable, "-m", "ditstream", "client", "stream", str(clip), "--url", server.url,
                        "--frames", str(N), "--in-flight", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"sent {N}, received {N}" in r.stdout
    cap = cv2.VideoCapture(str(out))
    got = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        got.append(img)
    cap.release()
    assert len(got) == N and got[0].shape == (48, 64, 3)  # the server's default size
