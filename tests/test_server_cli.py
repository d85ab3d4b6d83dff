"""``ditstream serve`` as a user runs it: a subprocess on a free port, then SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import websockets
from testkit import frame_message, free_port, jpeg, recv_frame, recv_json, wait_ready


def test_serve_tiny_model_then_sigterm(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "DITSTREAM_API_KEYS": "cli-key", "DITSTREAM_MAX_STREAMS": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "ditstream", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--width", "32", "--height", "32", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        headers = {"Authorization": "Bearer cli-key"}
        r = httpx.post(base + "/v1/images/generations", json={"prompt": "a cat", "size": "32x32"},
                       headers=headers, timeout=60)
        assert r.status_code == 200, r.text

        async def stream() -> dict:
            async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", additional_headers=headers) as ws:
                ready = await recv_json(ws)
                await ws.send(json.dumps({"type": "config", "prompt": "a dog"}))
                img = np.full((32, 32, 3), 120, np.uint8)
                await ws.send(frame_message(jpeg(img), 9))
                header, _ = await recv_frame(ws)
                assert header["seq"] == 9
                return ready

        ready = asyncio.run(stream())
        assert ready["config"]["width"] == 32 and ready["model"]["backend"] == "torch"
        assert "ditstream_requests_total" in httpx.get(base + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # uvicorn shuts down gracefully (lifespan shutdown ran), then re-raises the signal it caught.
    assert code in (0, -signal.SIGTERM)
    assert "server stopped" in proc.stdout.read().decode()


def test_serve_refuses_a_missing_model_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ditstream", "serve", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "cannot load model" in res.stderr and "Traceback" not in res.stderr
