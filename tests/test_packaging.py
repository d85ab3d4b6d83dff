"""A normal (non-editable) install: one `ditstream` namespace carrying the demo model and the page."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from testkit import wait_ready

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("ditstream-*.whl")
    return whl


def test_wheel_ships_demo_model_and_web_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    demo = ["ditstream/" + p.relative_to(ROOT).as_posix()
            for p in (ROOT / "engine" / "assets" / "demo").rglob("*") if p.is_file()]
    assert demo, "the demo model folder is empty"
    missing = [p for p in demo if p not in names]
    assert not missing, f"wheel lacks {missing}"
    assert {"ditstream/clients/web/index.html", "ditstream/clients/web/app.js", "ditstream/cli.py",
            "ditstream/engine/core.py", "ditstream/server/api/app.py", "ditstream/trt_build/cache.py"} <= names


def test_wheel_installs_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and tops - dist_info == {"ditstream"}, sorted(tops)
    top_level = f"{dist_info.pop()}/top_level.txt"
    if top_level in names:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["ditstream"]


def test_installed_wheel_serves_the_demo_and_page_without_the_source_tree(wheel, tmp_path):
    """Unpacked into a folder of its own (what `pip install .` puts in site-packages), run away from
    the repository: `import engine` fails, `ditstream serve` serves the demo model and the page."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    installed = sorted(p.name for p in target.iterdir() if p.name != "bin")  # bin/: the `ditstream` script
    assert installed == ["ditstream", "-".join(wheel.name.split("-")[:2]) + ".dist-info"], installed
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", "import engine"], env=env, cwd=run, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'engine'" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ditstream", "serve", "--port", str(port), "--log-level",
                             "warning"], env=env, cwd=run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "demo", models
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "app.js" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/web/app.js", timeout=10).status_code == 200
        where = subprocess.run([sys.executable, "-c", "import ditstream.engine; print(ditstream.engine.__file__)"],
                               env=env, cwd=run, capture_output=True, text=True).stdout
        assert where.startswith(str(target)), where
    finally:
        proc.terminate()
        proc.wait(30)
