"""scripts/gpu-check: the one command for a lent GPU machine, checked here through --dry-run and
--link-check (its package layout, built and imported as the GPU run does)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported first by the subprocess (sitecustomize on PYTHONPATH): makes this interpreter look like the
# lent machine's, where ditstream is not installed. An editable install resolves ditstream.engine
# through its own finder whatever sys.path says, and would hide a broken layout.
NOT_INSTALLED = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
"""


def test_gpu_check_dry_run_says_what_it_would_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert str(out) in text and not out.exists()  # says where, writes nothing
    assert "pytest" in text and "-m gpu" in text and "tests/test_tensorrt.py" in text
    assert "PYTHONSAFEPATH=1" in text  # python -m from the root must not put the source folder first
    pytest_line = next(line for line in text.splitlines() if " -m pytest " in line)
    listed = dict(re.findall(r"^    (tests/\S+\.py): (.*)$", text, flags=re.M))
    for name in ("test_gpu_engine.py", "test_gpu_compile.py", "test_gpu_batching.py", "test_gpu_memory.py"):
        assert f"tests/{name}" in listed, f"{name} not among the gpu tests listed: {sorted(listed)}"
        assert f"tests/{name}" in pytest_line  # and on the pytest command
    assert "test_a_thousand_frames_leave_device_memory_flat" in listed["tests/test_gpu_memory.py"]
    assert "test_tensorrt_matches_torch" in listed["tests/test_tensorrt.py"]  # each file's tests, by name
    assert "bench gpu" in text and f"--json-out {out}/bench-gpu.json" in text
    assert "bench engine --device cuda" in text
    assert re.search(r"diffusers==\d", text)  # the wheel it carries, at the lock's version
    assert "importlib" not in text  # not carried: it imports lazy_importer, and diffusers needs none on 3.12
    assert "-m ditstream.bench.live_streams --streams 1,4,8,16 --fps 30" in text and "--device cuda" in text
    assert "--backend compile" in text and f"--out {out}/live-streams.json" in text
    limits = [int(m) for m in re.findall(r"^\s+\S+\s+(\d+) s ", text, flags=re.M)]
    assert len(limits) == 6 and sum(limits) <= 480  # inside 8 minutes


def test_gpu_check_rejects_unknown_options():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--bogus"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_bench_engine_takes_a_device():
    from typer.testing import CliRunner

    from ditstream.cli import app

    result = CliRunner().invoke(app, ["bench", "engine", "--help"])
    assert result.exit_code == 0 and "--device" in result.output


def test_gpu_check_layout_imports_the_engine_from_the_link(tmp_path):
    """The setup step as the GPU run does it, from the repository root, on an interpreter without
    ditstream installed: ditstream.engine and .server must come from the link, not be missing
    (the source folder ditstream/ has neither and, first on sys.path, would shadow the link)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NOT_INSTALLED)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHON": sys.executable,
           "GPU_CHECK_SITE": str(tmp_path / "site"), "GPU_CHECK_WHL": str(empty), "PYTHONPATH": str(blocker),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--link-check"], capture_output=True,
                          text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    link = tmp_path / "site" / "pkg" / "ditstream" / "engine"
    assert f"ditstream.engine from {link}{os.sep}__init__.py" in proc.stdout, proc.stdout
