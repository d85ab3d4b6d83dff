"""A normal (non-editable) install must carry the demo model and the browser page."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_demo_model_and_web_page(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("ditstream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    demo = ["ditstream/" + p.relative_to(ROOT).as_posix()
            for p in (ROOT / "engine" / "assets" / "demo").rglob("*") if p.is_file()]
    assert demo, "the demo model folder is empty"
    missing = [p for p in demo if p not in names]
    assert not missing, f"wheel lacks {missing}"
    assert {"ditstream/clients/web/index.html", "ditstream/clients/web/app.js", "ditstream/cli.py",
            "ditstream/engine/core.py"} <= names
