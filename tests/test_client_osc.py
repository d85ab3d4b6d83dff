"""OSC control of ``ditstream client stream --osc-port`` (issue 28): messages sent with python-osc's
``SimpleUDPClient`` over loopback become config changes of the running stream.

In process: every address maps to the config change the issue names, checked by the server's own
config model (``StreamConfigCheck``); changes are coalesced to one message per output frame; each bad
value is one log line naming its address, and nothing is sent for it; a reconnect keeps what OSC changed.
End to end: the demo model served on loopback, ``client stream pattern --osc-port`` as a user runs
it; OSC turns the output from the default prompt's blue to green, a tiny strength brings the input's
red back, bad values are dropped with one line each, and the stream runs to its end without an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import simplejpeg
from ditstream.clients.media import open_source
from ditstream.clients.osc import OscControl
from ditstream.clients.stream_client import Reconnect, pack_frame, run_stream, unpack_frame
from ditstream.engine.config import StreamConfig
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import read_image
from pythonosc.udp_client import SimpleUDPClient

from ditstream.bench.harness import ServerThread
from ditstream.bench.scale_harness import free_port
from ditstream.commands._studio import StreamConfigCheck

GREEN = ds.caption_for("circle", "green", "white")
READY = {"type": "ready", "config": {**StreamConfig(width=64, height=64).to_dict(), "fps": 30.0},
         "limits": {"max_prompt_chars": 2000, "max_pixels": 1024 * 1024, "size_multiple": 8, "max_fps": 60},
         "model": {"loras": {"swap": 0.0}}}


def _wait(condition: Any, what: str, timeout: float = 10.0) -> None:
    """Poll until ``condition()`` (UDP and other processes give no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def _await(condition: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------ in process
def test_osc_messages_become_checked_coalesced_config_changes(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[dict[str, Any]] = []
    bad = [("/ditstream/strength", 7.0), ("/ditstream/seed", "abc"), ("/ditstream/transition_frames", 2.5),
           ("/ditstream/blend", ["a", "b", 2.0]), ("/ditstream/lora/swap", "x"), ("/ditstream/temporal", 1.5)]

    async def main() -> None:
        control = OscControl("127.0.0.1", free_port(), StreamConfigCheck)
        await control.start(READY, sent.append)
        osc = SimpleUDPClient("127.0.0.1", control.port)
        try:
            osc.send_message("/ditstream/prompt", GREEN)
            await _await(lambda: sent, "the first change")
            assert sent == [{"prompt": GREEN}]  # nothing sent since the last output: goes out at once
            for address, value in [("/ditstream/strength", 0.3), ("/ditstream/strength", 0.4),
                                   ("/ditstream/seed", 7), ("/ditstream/lora/swap", 0.5),
                                   ("/ditstream/blend", ["a", "b", 0.25]), ("/ditstream/temporal", 0.5),
                                   *bad, ("/ditstream/width", 128), ("/ditstream/width", 96),
                                   ("/other/thing", 1), ("/ditstream/guidance_scale", 3.5)]:
                osc.send_message(address, value)
            await _await(lambda: any("guidance_scale" in c for c in (control.pending, *sent)), "the last message")
            assert len(sent) == 1, sent  # coalesced: waits for the next output frame
            control.output()
            control.output()  # nothing pending: nothing sent
        finally:
            control.close()

    with caplog.at_level(logging.WARNING, logger="ditstream.clients.osc"):
        asyncio.run(main())
    assert sent[1:] == [{"strength": 0.4, "seed": 7, "loras": {"swap": 0.5}, "temporal": 0.5,
                         "prompt": [{"text": "a", "weight": 0.75}, {"text": "b", "weight": 0.25}],
                         "guidance_scale": 3.5}], sent
    lines = [r.getMessage() for r in caplog.records]
    for address, _ in bad:
        assert sum(address + " " in line and "dropped" in line for line in lines) == 1, (address, lines)
    assert "strength must be in (0, 1], got 7.0" in " ".join(lines)  # the server's own message
    assert sum("/ditstream/width" in line and "fixed" in line for line in lines) == 1, lines
    assert sum("/other/thing" in line for line in lines) == 1, lines
    assert len(lines) == len(bad) + 2, lines


def test_a_reconnect_opens_with_the_changes_osc_made() -> None:
    """After a 1012 the new stream's opening config holds the OSC change, not the first config."""
    configs: list[dict[str, Any]] = []
    opened: list[int] = []

    async def handler(ws: Any) -> None:
        opened.append(len(configs))
        await ws.send(json.dumps({"type": "ready", "session": "s", **{k: READY[k] for k in ("config", "model")}}))
        async for msg in ws:
            if isinstance(msg, str):
                configs.append(json.loads(msg))
                continue
            header, _ = unpack_frame(msg)
            await ws.send(pack_frame({"seq": header["seq"]}, b"jpeg"))
            if len(opened) == 1 and len(configs) == 2 and header["seq"] >= 3:
                await ws.close(1012, "restart")

    class Nudge:
        """A control that changes the prompt after the first output, as an OSC message would."""

        async def start(self, ready: dict[str, Any], send: Any) -> None:
            self.send = send

        def output(self) -> None:
            if len(configs) == 1:
                self.send({"prompt": GREEN})

        def close(self) -> None:
            pass

    async def main() -> Any:
        from websockets.asyncio.server import serve

        async with serve(handler, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            return await run_stream(url, open_source("pattern", 32, 32), config={"prompt": "x"}, fps=200,
                                    max_frames=12, reconnect=Reconnect(attempts=2, first_delay_s=0.01),
                                    control=Nudge())

    stats = asyncio.run(main())
    assert stats.reconnects == 1
    assert [c.get("prompt") for c in configs] == ["x", GREEN, GREEN], configs


# ------------------------------------------------------------------------------------ end to end
def _frames(folder: Path) -> list[Path]:
    """Output files written so far, by seq, less the newest (it may be half written)."""
    return sorted(folder.glob("frame_*.jpg"))[:-1]


def _colour_after(folder: Path, seq: int, colour: str, what: str, proc: subprocess.Popen) -> int:
    """Wait for an output after ``seq`` read as ``colour``; its seq."""
    def seen() -> bool:
        assert proc.poll() is None, f"the client ended before {what}:\n{proc.communicate()[1][-3000:]}"
        return any(int(p.stem[6:]) > seq and _colour(p) == colour for p in _frames(folder))

    _wait(seen, what, timeout=20.0)
    return int(_frames(folder)[-1].stem[6:])


def _colour(path: Path) -> str | None:
    return read_image(simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB")).colour


def test_client_stream_takes_osc_control_end_to_end(demo_stream_server: ServerThread, tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "frames"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditstream", "client", "stream", "pattern", "--url", demo_stream_server.url,
         "--osc-port", str(port), "--out", str(out), "--fps", "15", "--frames", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        osc = SimpleUDPClient("127.0.0.1", port)
        mark = _colour_after(out, -1, "blue", "the default prompt's blue", proc)  # OSC listens by now
        osc.send_message("/ditstream/prompt", GREEN)
        mark = _colour_after(out, mark, "green", "the prompt sent over OSC", proc)
        osc.send_message("/ditstream/strength", 7.0)
        osc.send_message("/ditstream/seed", "abc")
        osc.send_message("/ditstream/strength", 0.02)  # the input's red comes back
        last = _colour_after(out, mark, "red", "the strength sent over OSC", proc)
        print(f"OSC phases done at seq {last}")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "done: " in stdout and "server error" not in stderr + stdout, stderr[-3000:]
    assert "reconnecting" not in stderr, stderr[-3000:]
    dropped = [line for line in stderr.splitlines() if "dropped" in line]
    assert len(dropped) == 2, stderr[-3000:]
    assert "/ditstream/strength 7.0" in dropped[0] and "/ditstream/seed 'abc'" in dropped[1], dropped
    seqs = [int(p.stem[6:]) for p in sorted(out.glob("frame_*.jpg"))]
    assert seqs[-1] > mark + 5, "the stream did not go on after the OSC changes"


def test_an_osc_port_in_use_is_a_usage_error_before_the_stream_opens() -> None:
    import socket

    from typer.testing import CliRunner

    from ditstream.cli import app

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        res = CliRunner().invoke(app, ["client", "stream", "pattern", "--url", "http://127.0.0.1:9",
                                       "--osc-port", str(port)])
    assert res.exit_code == 2, res.output
    assert f"cannot listen for OSC on udp 127.0.0.1:{port}" in res.output, res.output
