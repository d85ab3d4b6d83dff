"""The README's quick start, run as written on the demo model.

``ditstream serve`` (from the "Two commands" block, after ``scripts/install &&``) runs on a free port;
``DITSTREAM_PORT`` and ``DITSTREAM_URL`` point the commands at it, so each line is run exactly as the
README prints it, with this interpreter's ``ditstream`` first on PATH.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image
from testkit import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def _block_after(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no bash block after {heading!r}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_as_written(tmp_path):
    (install_and_serve,) = _block_after("## Two commands")
    assert install_and_serve.startswith("scripts/install && ")
    serve = install_and_serve.removeprefix("scripts/install && ")
    commands = _block_after("## Quick start")
    assert all(c.startswith("ditstream ") for c in commands), commands

    port = free_port()
    env = {**os.environ, "DITSTREAM_PORT": str(port), "DITSTREAM_URL": f"http://127.0.0.1:{port}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["bash", "-c", f"exec {serve}"], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log=tmp_path / "serve.log")
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        for command in commands:
            r = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    # what the commands say they write is there, at the demo model's size
    for name in ("circle.png", "triangle.png", "star.png"):
        assert Image.open(tmp_path / name).size == (64, 64), name
    assert len(list((tmp_path / "frames").glob("*.jpg"))) >= 10
