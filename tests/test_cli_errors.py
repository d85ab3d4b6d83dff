"""Every command as a user meets it when something is wrong: one line, a documented exit code, no traceback.

Bad arguments must be refused before the model loads (it can take half a minute): each test pairs the
bad argument with a model that does not exist, so an error about the argument proves it was checked first.
"""

from __future__ import annotations

import socket
import subprocess
from importlib.metadata import version

import numpy as np
import pytest
from PIL import Image
from testkit import run_cli

EXIT_SERVER, EXIT_USAGE = 1, 2



def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def _no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ditstream {version('ditstream')}"


@pytest.mark.parametrize("args, complaint", [
    (["--image", "missing.png"], "does not exist"),
    (["--size", "12"], "512x512"),
    (["--size", "0x64"], "positive"),
    (["--out", "x.gif"], ".gif"),
    (["--out", "noextension"], "without extension"),
])
def test_generate_refuses_bad_arguments_before_loading_the_model(tmp_path, args, complaint):
    r = run_cli("generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "x", *args)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert complaint in r.stderr and "no-such-model" not in r.stderr
    _no_traceback(r)


def test_generate_refuses_an_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = run_cli("generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "x", "--image", str(bad))
    assert r.returncode == EXIT_USAGE and "cannot read" in r.stderr
    _no_traceback(r)


def test_serve_refuses_a_port_in_use_before_loading_the_model(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run_cli("serve", "--model", str(tmp_path / "no-such-model"), "--port", str(port))
    assert r.returncode == EXIT_USAGE
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "cannot load model" not in r.stderr
    _no_traceback(r)


def test_client_commands_with_the_server_down(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    for args in (["client", "generate", "a red circle on a white background", "--out", str(tmp_path / "a")],
                 ["client", "stream", "pattern", "--frames", "2"],
                 ["client", "stream", "pattern", "--frames", "2", "--size", "64x64"]):
        r = run_cli(*args, "--url", url)
        assert r.returncode == EXIT_SERVER, (args, r.stderr)
        assert "cannot reach the server" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        _no_traceback(r)
    r = run_cli("client", "generate", "x", env={"DITSTREAM_URL": url})  # the env var is the default --url
    assert r.returncode == EXIT_SERVER and url in r.stderr


@pytest.mark.parametrize("args, complaint", [
    (["client", "generate", "x", "--out", "x.gif"], ".gif"),
    (["client", "generate", "x", "--out", "x.png", "--output-format", "jpeg"], "is not --output-format"),
    (["client", "generate", "x", "--image", "missing.png"], "does not exist"),
    (["client", "generate", "x", "--size", "big"], "--size"),
    (["client", "stream", "missing.mp4"], "existing video file"),
    (["client", "stream", "webcam:x"], "must be a number"),
    (["client", "stream", "pattern", "--size", "64"], "--size"),
])
def test_client_commands_refuse_bad_arguments_before_calling(args, complaint):
    r = run_cli(*args, "--url", f"http://127.0.0.1:{_closed_port()}")  # nothing is called: no network error
    assert r.returncode == EXIT_USAGE, r.stderr
    assert complaint in r.stderr and "cannot reach" not in r.stderr
    _no_traceback(r)


def test_client_generate_out_extension_picks_the_format(tmp_path):
    from ditstream.engine.null import null_runner
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings

    from ditstream.bench.harness import ServerThread

    with ServerThread(create_app(Settings(model="null", default_width=32, default_height=32), null_runner())) as srv:
        r = run_cli("client", "generate", "x", "--url", srv.url, "--out", str(tmp_path / "a.jpg"))
        assert r.returncode == 0, r.stderr
        assert Image.open(tmp_path / "a.jpg").format == "JPEG" and not (tmp_path / "a.jpg.png").exists()
        src = tmp_path / "in.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src)
        r = run_cli("client", "generate", "x", "--url", srv.url, "--image", str(src), "--out", str(tmp_path / "b"))
        assert r.returncode == 0 and Image.open(tmp_path / "b.png").format == "PNG"
