"""Every third-party module the shipped code imports comes from a distribution pyproject.toml
declares (in ``dependencies`` or an extra). A fresh install has only those: an import of
something that happened to be installed here (scipy was one, found by a fresh clone) passes every
test on this machine and fails on a user's."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Folders holding shipped code (pyproject's package-dir), i.e. what a wheel carries.
SHIPPED = sorted({ROOT / d for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()})
OWN = {"ditstream", "engine", "server", "clients", "trt_build"}
#: Modules of GPU-only extras not installed on CPU machines, so absent from packages_distributions().
NOT_INSTALLED_HERE = {"tensorrt": "tensorrt-cu13", "onnx_graphsurgeon": "onnx-graphsurgeon", "pynvml": "nvidia-ml-py"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in reqs}


def imported(folders: list[Path]) -> dict[str, list[str]]:
    """Top-level module -> files importing it (absolute imports only; relative ones are our own)."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def undeclared(modules: dict[str, list[str]], allowed: set[str]) -> dict[str, str]:
    dists = md.packages_distributions()
    bad = {}
    for mod, files in sorted(modules.items()):
        if mod in sys.stdlib_module_names or mod in OWN or mod == "__future__":
            continue
        names = dists.get(mod) or ([NOT_INSTALLED_HERE[mod]] if mod in NOT_INSTALLED_HERE else [])
        if not names:
            bad[mod] = f"no installed distribution provides it (imported by {files[0]})"
        elif not {_norm(n) for n in names} & allowed:
            bad[mod] = f"from {names}, not declared in pyproject.toml (imported by {files[0]})"
    return bad


def test_shipped_imports_are_declared():
    modules = imported(SHIPPED)
    assert {"torch", "diffusers", "fastapi", "redis"} <= set(modules)  # the walk sees the code
    assert undeclared(modules, declared()) == {}


def test_the_check_catches_an_undeclared_import():
    """Taking one declared distribution away must make its module an offence."""
    modules = imported(SHIPPED)
    bad = undeclared(modules, declared() - {"simplejpeg"})
    assert set(bad) == {"simplejpeg"}, bad
