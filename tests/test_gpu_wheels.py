"""The wheels ``scripts/gpu-check --fetch`` carries install on the lent GPU image's Python 3.12 and, with
the image's own packages, cover everything ``ditstream serve`` imports.

The image (issue 25) holds Python 3.12, torch, transformers, peft, onnx, onnxruntime, prometheus-client,
typer, httpx, opencv and what pip installed with them (``IMAGE`` below, their requirements as
published); nothing can be downloaded there. The import closure of ``serve`` is computed here: a
subprocess builds the app on the demo model the way ``serve`` does (``load_runner``, ``create_app``,
uvicorn's ``Config.load``, which imports its HTTP and WebSocket protocol classes) and reports its
modules. A module counts as needed when its distribution is a requirement of ditstream or of a
needed package (not of an image package: the image brings its own), so incidental imports of
whatever happens to be installed here (an optional backend a library probes for) do not count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20

#: What the lent image has (issue 25), with what pip installed for them (their published requirements).
IMAGE = {canonicalize_name(n) for n in """
torch filelock typing-extensions setuptools sympy mpmath networkx jinja2 markupsafe fsspec triton
transformers huggingface-hub hf-xet numpy packaging pyyaml regex tokenizers safetensors tqdm
peft psutil accelerate onnx protobuf ml-dtypes onnxruntime flatbuffers coloredlogs humanfriendly
prometheus-client typer click shellingham rich markdown-it-py mdurl pygments
httpx anyio sniffio certifi httpcore h11 idna opencv-python opencv-python-headless
""".split()}

CLOSURE = """
import json, sys
from ditstream.server.settings import Settings
from ditstream.server.api.factory import load_runner
from ditstream.server.api.app import create_app
import ditstream.commands.serve, uvicorn
settings = Settings(model="demo", device="cpu")
app = create_app(settings, load_runner(settings))
uvicorn.Config(app, ws_per_message_deflate=False).load()
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def carried_pins() -> dict[str, str]:
    """name → version of the wheels gpu-check carries, as its --dry-run states them."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "GPU_CHECK_WHL": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    setup = next(line for line in proc.stdout.splitlines() if line.strip().startswith("setup "))
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([^\s)]+)", setup))
    assert pins, setup
    return {canonicalize_name(k): v for k, v in pins.items()}


def _requires(name: str) -> list[str]:
    try:
        reqs = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    env = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.3"}
    return [canonicalize_name(r.name) for r in map(Requirement, reqs) if not r.marker or r.marker.evaluate(env)]


def needed_beyond_image(imported: set[str]) -> set[str]:
    """Distributions ``serve`` imports that ditstream (transitively, not through the image) requires."""
    seen: set[str] = set()
    todo = ["ditstream"]
    while todo:
        name = todo.pop()
        if name in seen or name in IMAGE:
            continue
        seen.add(name)
        todo += _requires(name)
    return (seen & imported) - {"ditstream"}


def test_carried_wheels_with_the_image_cover_what_serve_imports():
    proc = subprocess.run([sys.executable, "-c", CLOSURE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    dists = metadata.packages_distributions()
    imported = {canonicalize_name(d) for m in modules for d in dists.get(m, [])}
    assert {"fastapi", "uvicorn", "diffusers", "websockets"} <= imported  # the closure is real
    missing = needed_beyond_image(imported) - set(carried_pins())
    assert not missing, f"serve imports these, the image lacks them and gpu-check does not carry them: {missing}"


def _tags_ok(filename: str) -> bool:
    """A wheel that installs on CPython 3.12, Linux x86_64 (glibc: manylinux)."""
    _, _, _, tags = parse_wheel_filename(filename)
    for t in tags:
        py_ok = t.interpreter in ("py3", "cp312") or (t.abi == "abi3" and t.interpreter.startswith("cp3")
                                                       and int(t.interpreter[3:]) <= 12)
        abi_ok = t.abi in ("none", "abi3", "cp312")
        plat_ok = t.platform == "any" or re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", t.platform)
        if py_ok and abi_ok and plat_ok:
            return True
    return False


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> list[Path]:
    """The carried wheels: ``.whl/`` when it holds every pin, else fetched as ``--fetch`` does."""
    pins = carried_pins()
    folder = ROOT / ".whl"
    if not all(any(canonicalize_name(parse_wheel_filename(w.name)[0]) == n and str(parse_wheel_filename(w.name)[1]) == v
                   for w in folder.glob("*.whl")) for n, v in pins.items()):
        folder = tmp_path_factory.mktemp("whl")
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--fetch"], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "GPU_CHECK_WHL": str(folder)})
        # No skip when PyPI is unreachable: every machine that runs this suite installed it from that
        # registry (scripts/install), so a failed fetch is a fault of the fetch, reported as one.
        assert proc.returncode == 0, "gpu-check --fetch failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    found = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in folder.glob("*.whl")}
    assert set(pins) <= set(found), f"not fetched: {set(pins) - set(found)}"
    return [found[n] for n in pins]


def test_carried_wheels_are_for_cpython_312_on_linux_x86_64_and_fit_the_carry_limit(wheels):
    bad = [w.name for w in wheels if not _tags_ok(w.name)]
    assert not bad, f"wheels that would not install on the image's Python 3.12 / x86_64: {bad}"
    assert sum(w.stat().st_size for w in wheels) <= LIMIT_BYTES
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            assert z.testzip() is None, w.name


def _python312() -> str | None:
    """A CPython 3.12 with pip: ``DITSTREAM_PYTHON312``, on PATH, or a pyenv install (pyenv's shim
    refuses versions that are not selected, so the versions folder is asked directly)."""
    candidates = [os.environ.get("DITSTREAM_PYTHON312"), shutil.which("python3.12"),
                  *sorted(map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))]
    for c in filter(None, candidates):
        if subprocess.run([c, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return c
    return None


def test_carried_wheels_install_with_no_index_no_deps_on_python_312(wheels, tmp_path):
    py312 = _python312()
    if py312 is None:
        pytest.skip("no Python 3.12 with pip here; the wheel tags are checked by the test above")
    target = tmp_path / "site"
    proc = subprocess.run([py312, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), *map(str, wheels)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The image's pure-Python packages these import, from this interpreter's install (a stand-in for
    # the image's: same sources, any Python 3); numpy/torch users (diffusers, simplejpeg) are not imported.
    image = tmp_path / "image"
    image.mkdir()
    for mod in ("typing_extensions", "anyio", "idna", "sniffio", "h11", "click", "certifi"):
        spec = importlib.util.find_spec(mod)
        src = Path(spec.origin)
        (image / (src.name if src.name != "__init__.py" else mod)).symlink_to(src if src.name != "__init__.py"
                                                                              else src.parent)
    code = ("import pydantic_core, pydantic, pydantic_settings, fastapi, starlette, uvicorn, websockets, "
            "websockets.speedups, redis, multipart, dotenv, opentelemetry.trace, PIL.Image, charset_normalizer; "
            "import sys; assert sys.version_info[:2] == (3, 12); print(pydantic_core.__file__)")
    proc = subprocess.run([py312, "-I", "-c", f"import sys; sys.path[:0] = [{str(target)!r}, {str(image)!r}]; {code}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(str(target))
