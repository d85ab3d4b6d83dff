"""The CPU image, built here by scripts/build-image (buildah, no Docker engine), really serves.

Starts the image's own ENTRYPOINT + CMD (tini -> entrypoint.sh -> `ditstream serve`) with
`buildah run --isolation chroot`, as the image's user, then checks /health, one generated image
from /v1/images/generations, and the image's HEALTHCHECK script.

Building the image takes longer than CI may spend (minutes: a Debian base, torch and every
dependency), so this test never builds it: it runs only where the image already exists in
buildah's storage (`scripts/build-image --test` builds it and runs this file) and is skipped
otherwise, saying why. DITSTREAM_CONTAINER_IMAGE names another image.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from testkit import free_port

IMAGE = os.environ.get("DITSTREAM_CONTAINER_IMAGE", "localhost/ditstream:cpu")
BUILDAH_ENV = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
START_TIMEOUT_S = 240  # importing torch and loading the demo model on a busy 2-core machine
PROMPT = "a blue circle on a white background"


def _buildah(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", *args], env=BUILDAH_ENV, capture_output=True, text=True, check=check, timeout=timeout
    )


def _skip_reason() -> str | None:
    run_it = "run scripts/build-image (or scripts/build-image --test)"
    if shutil.which("buildah") is None:
        return f"no image built on this machine (buildah is not installed); {run_it}"
    if os.geteuid() != 0:
        return f"buildah's chroot isolation needs root; {run_it} as root"
    found = _buildah("images", "--quiet", IMAGE, check=False)
    if found.returncode != 0 or not found.stdout.strip():
        return f"no image built on this machine ({IMAGE} is not in buildah's vfs storage); {run_it}"
    return None


_reason = _skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")



def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _session_pids(sid: int) -> list[int]:
    """Every live process of session `sid`: buildah, tini and ditstream (tini gives its child a process
    group of its own, so killing buildah's group would leave the server running)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM to tini, which forwards it to ditstream (a graceful stop, as `docker stop` does; buildah
    itself would SIGKILL its child), then SIGKILL to whatever of the session lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        pids = _session_pids(proc.pid)
        for pid in pids:
            if sig == signal.SIGKILL or _comm(pid) == "tini":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
        if not _session_pids(proc.pid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    assert not _session_pids(proc.pid), "the container's processes outlived SIGKILL"


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory):
    """A working container of IMAGE running its own entrypoint; yields (base_url, name, log path)."""
    config = json.loads(_buildah("inspect", "--type", "image", IMAGE).stdout)["OCIv1"]["config"]
    argv = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    assert argv[:3] == ["tini", "--", "entrypoint.sh"] and argv[3:] == ["serve"], argv
    name = f"ditstream-test-{uuid.uuid4().hex[:8]}"
    _buildah("from", "--pull-never", "--name", name, IMAGE)
    port = free_port()
    log = (tmp_path_factory.mktemp("container") / "serve.log").open("w+b")
    # No --user: buildah run uses the image's USER (ditstream), ENV, and WORKDIR. The chroot shares the
    # host's network, so the port is chosen here (DITSTREAM_PORT, read by `ditstream serve`); there is
    # no PID namespace either, so tini reaps as a subreaper (TINI_SUBREAPER) instead of as PID 1.
    env_args = ["-e", f"DITSTREAM_PORT={port}", "-e", "TINI_SUBREAPER=1"]
    proc = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", *env_args, name, "--", *argv],
        env=BUILDAH_ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(
                    f"container exited with {proc.returncode}:\n{log.read().decode(errors='replace')[-4000:]}"
                )
            try:
                if _get(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(
                    f"no /health within {START_TIMEOUT_S}s:\n{log.read().decode(errors='replace')[-4000:]}"
                )
            time.sleep(1)
        yield base, name, log
    finally:
        _stop_session(proc)
        _buildah("rm", name, check=False)
        log.close()


def test_health(container):
    base, _name, _log = container
    status, body = _get(f"{base}/health")
    assert status == 200, body


def test_generates_an_image(container):
    base, _name, _log = container
    status, body = _post_json(f"{base}/v1/images/generations", {"prompt": PROMPT})
    assert status == 200, body
    (item,) = body["data"]
    png = base64.b64decode(item["b64_json"])
    assert _png_size(png) == (64, 64)


def test_runs_as_the_image_user_and_its_healthcheck_passes(container):
    base, name, _log = container
    # The image's HEALTHCHECK command (kept by buildah's docker format), run inside the container as
    # Docker would run it.
    docker_config = json.loads(_buildah("inspect", "--type", "image", IMAGE).stdout)["Docker"]["config"]
    test = (docker_config.get("Healthcheck") or {}).get("Test") or ["CMD", "healthcheck.sh"]
    assert test[0] == "CMD" and test[1:] == ["healthcheck.sh"], test
    port = base.rsplit(":", 1)[1]
    hc = _buildah(
        "run",
        "--isolation",
        "chroot",
        "-e",
        f"DITSTREAM_PORT={port}",
        name,
        "--",
        *test[1:],
        check=False,
        timeout=30,
    )
    assert hc.returncode == 0, hc.stdout + hc.stderr
    who = _buildah("run", "--isolation", "chroot", name, "--", "id", "-un", timeout=30)
    assert who.stdout.strip() == "ditstream"
