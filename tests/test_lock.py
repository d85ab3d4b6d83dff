"""requirements/lock.txt is the one dependency set: it must agree with pyproject.toml, and be in force."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"lock line is not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    toml = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, unlocked = toml["project"], set(toml["tool"]["ditstream"]["unlocked-extras"])
    reqs = [Requirement(r) for r in project["dependencies"]]
    for name, extra in project.get("optional-dependencies", {}).items():
        if name not in unlocked:
            reqs += [Requirement(r) for r in extra if not r.startswith("ditstream")]
    return reqs


def test_every_declared_dependency_is_locked_within_its_range():
    pins = _lock()
    problems = []
    for req in _declared():
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins, "torch is pinned by scripts/install, not by the lock"
            continue
        if name not in pins:
            problems.append(f"{req} is not in requirements/lock.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} but the lock has {pins[name]}")
    assert not problems, "pyproject.toml and the lock disagree (run scripts/lock):\n" + "\n".join(problems)


def test_the_lock_is_in_force_here():
    """What this interpreter runs with is what the lock says (scripts/install installs with -c lock)."""
    wrong = []
    for name, version in _lock().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # an extra not installed here (e.g. onnx on a slim install)
        if installed != version:
            wrong.append(f"{name}: installed {installed}, locked {version}")
    assert not wrong, "installed packages differ from requirements/lock.txt:\n" + "\n".join(wrong)
