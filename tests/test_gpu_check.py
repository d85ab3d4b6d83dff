"""scripts/gpu-check: the one command for a lent GPU machine, checked here through --dry-run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_says_what_it_would_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert str(out) in text and not out.exists()  # says where, writes nothing
    assert "pytest" in text and "-m gpu" in text and "tests/test_tensorrt.py" in text
    assert "bench gpu" in text and f"--json-out {out}/bench-gpu.json" in text
    assert "bench engine --device cuda" in text
    assert re.search(r"diffusers==\d", text)  # the wheel it carries, at the lock's version
    limits = [int(m) for m in re.findall(r"^\s+\S+\s+(\d+) s ", text, flags=re.M)]
    assert len(limits) == 5 and sum(limits) <= 480  # inside 8 minutes


def test_gpu_check_rejects_unknown_options():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--bogus"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_bench_engine_takes_a_device():
    from typer.testing import CliRunner

    from ditstream.cli import app

    result = CliRunner().invoke(app, ["bench", "engine", "--help"])
    assert result.exit_code == 0 and "--device" in result.output
