"""The Python clients against a real server: stream (pattern, video file), txt2img, REST generate."""

from __future__ import annotations

import ast
import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from ditstream.clients.media import open_source
from ditstream.clients.rest_client import APIError, generate
from ditstream.clients.stream_client import run_stream
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from PIL import Image

from ditstream.bench.harness import ServerThread

KEY = "client-key-1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    settings = Settings(model="null", api_keys=[KEY], default_width=64, default_height=48)
    with ServerThread(create_app(settings, null_runner())) as srv:
        yield srv


def test_clients_speak_the_wire_protocol_only():
    for path in (ROOT / "clients").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.removeprefix("ditstream.").split(".")[0]
                assert top not in ("engine", "server"), f"{path.name} imports {name}"


def test_stream_client_pattern_to_folder(server, tmp_path):
    from ditstream.clients.media import FolderSink

    sink = FolderSink(tmp_path / "out")
    stats = asyncio.run(run_stream(server.ws_url, open_source("pattern", 64, 48), config={"prompt": "x"},
                                   fps=60, max_frames=15, api_key=KEY, max_in_flight=1, on_output=sink))
    assert stats.errors == []
    assert stats.sent == stats.received == 15
    assert stats.seqs == list(range(15))
    assert len(stats.latencies_ms) == 15 and all(v > 0 for v in stats.latencies_ms)
    files = sorted((tmp_path / "out").glob("*.jpg"))
    assert len(files) == 15 and Image.open(files[0]).size == (64, 48)


def test_stream_client_video_file_to_video(server, tmp_path):
    import av
    src = tmp_path / "in.avi"
    with av.open(str(src), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 80, 60, "yuv420p"
        for i in range(8):
            img = np.full((60, 80, 3), i * 30, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    from ditstream.clients.media import VideoSink

    out = tmp_path / "out.avi"
    sink = VideoSink(out, fps=10)
    stats = asyncio.run(run_stream(server.ws_url, open_source(str(src), 64, 48, loop=False), fps=30,
                                   api_key=KEY, max_in_flight=1, on_output=sink))
    sink.close()
    assert stats.sent == stats.received == 8
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 8 and (frames[0].width, frames[0].height) == (64, 48)


def test_stream_client_txt2img(server):
    stats = asyncio.run(run_stream(server.ws_url, iter(()), config={"mode": "txt2img", "fps": 20},
                                   max_frames=5, api_key=KEY))
    assert stats.received >= 5 and stats.seqs == sorted(stats.seqs)


def test_rest_client_generate_and_edit(server, tmp_path):
    (png,) = generate(server.url, "a cat", size="32x32", api_key=KEY)
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(src)
    blobs = generate(server.url, "a cat", image=src, n=2, strength=0.5, output_format="jpeg", api_key=KEY)
    assert [Image.open(io.BytesIO(b)).format for b in blobs] == ["JPEG", "JPEG"]
    with pytest.raises(APIError) as info:
        generate(server.url, "a cat", api_key="wrong")
    assert info.value.status == 401


def test_cli_client_commands(server, tmp_path):
    from typer.testing import CliRunner

    from ditstream.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["client", "generate", "a dog", "--url", server.url, "--api-key", KEY,
                              "--size", "32x32", "--n", "2", "--out", str(tmp_path / "img")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "img_0.png").exists() and (tmp_path / "img_1.png").exists()
    res = runner.invoke(app, ["client", "stream", "pattern", "--url", server.ws_url, "--api-key", KEY,
                              "--frames", "6", "--fps", "30", "--in-flight", "1", "--out", str(tmp_path / "frames")])
    assert res.exit_code == 0, res.output
    assert "done: sent 6, received 6" in res.output
    assert len(list((tmp_path / "frames").glob("*.jpg"))) == 6
