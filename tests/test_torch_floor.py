"""The oldest torch ditstream declares (pyproject ``torch>=X``) is one it can run on.

Only the pinned torch (CI) and the GPU image's torch 2.11 are ever run, so the floor is checked by
reading: the source is scanned for torch APIs that arrived after some release (``NEWER_APIS``, each
with the release that brought it), and the locked transformers is asked for its own torch floor (it
switches torch off below it: ``is_torch_available()`` is False and the Gemma text encoder cannot
load). The declared floor must be at least the highest of these.

What sets it today: transformers 5.x (the lock's) needs torch >= 2.6; the source's own newest API is
``torch.onnx.export(..., dynamo=False)`` (the ``dynamo`` keyword arrived in 2.5; ``trt_build/export.py``,
used by ``build-engine`` and the onnx backend). The torch and compile backends alone use nothing
newer than 2.1 (``torch.compiler.cudagraph_mark_step_begin``, ``torch.utils.flop_counter``).
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("engine", "server", "ditstream", "trt_build")

#: regex over the source → (first torch release that has it, what it is).
NEWER_APIS: dict[str, tuple[str, str]] = {
    r"torch\.onnx\.export\((?:[^()]|\([^()]*\))*\bdynamo\s*=": ("2.5", "the dynamo= keyword of torch.onnx.export"),
    r"torch\.compiler\.set_stance": ("2.6", "torch.compiler.set_stance"),
    r"torch\.accelerator\.": ("2.6", "the torch.accelerator module"),
    r"torch\.nn\.attention\.flex_attention": ("2.5", "flex attention"),
    r"torch\.export\.export_for_training": ("2.5", "torch.export.export_for_training"),
    r"\bnn\.RMSNorm\b|functional\.rms_norm\b": ("2.4", "torch.nn.RMSNorm / F.rms_norm"),
    r"torch\.library\.custom_op": ("2.4", "torch.library.custom_op"),
    r"torch\.serialization\.add_safe_globals": ("2.4", "torch.serialization.add_safe_globals"),
    r"torch\.nn\.attention\.sdpa_kernel": ("2.3", "torch.nn.attention.sdpa_kernel"),
    r"torch\.compiler\.is_compiling": ("2.3", "torch.compiler.is_compiling"),
    r"torch\.compiler\.cudagraph_mark_step_begin": ("2.1", "torch.compiler.cudagraph_mark_step_begin"),
    r"torch\.utils\.flop_counter": ("2.1", "torch.utils.flop_counter"),
}


def declared_floor() -> Version:
    # The dependency line, read as text: tomllib is not in Python 3.10's standard library.
    line = re.search(r'^\s*"(torch[^"]*)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert line, "no torch requirement in pyproject.toml"
    return Version(next(s.version for s in Requirement(line.group(1)).specifier if s.operator == ">="))


def source_floors() -> dict[str, tuple[Version, str]]:
    """file → (the newest torch release it needs, why), for files using any of ``NEWER_APIS``."""
    found: dict[str, tuple[Version, str]] = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for pattern, (release, what) in NEWER_APIS.items():
                if re.search(pattern, text) and Version(release) > found.get(str(path), (Version("0"), ""))[0]:
                    found[str(path.relative_to(ROOT))] = (Version(release), what)
    return found


def transformers_floor() -> Version:
    from transformers.dependency_versions_table import deps

    return Version(next(s.version for s in Requirement(deps["torch"]).specifier if s.operator == ">="))


def test_the_declared_torch_floor_covers_the_source_and_the_locked_transformers():
    floors = source_floors()
    assert floors["trt_build/export.py"][0] == Version("2.5")  # the scan sees what it is meant to see
    needed = max([transformers_floor(), *(v for v, _ in floors.values())])
    why = {f: w for f, (v, w) in floors.items() if v == needed} or {"transformers": "its own torch floor"}
    assert declared_floor() >= needed, f"pyproject says torch>={declared_floor()}, but {needed} is needed: {why}"


def test_the_scan_finds_each_listed_api():
    samples = {
        "torch.onnx.export(m, (x, y), path, dynamo=False, opset_version=17)": "2.5",
        "torch.compiler.set_stance('force_eager')": "2.6",
        "layer = nn.RMSNorm(8)": "2.4",
        "torch.compiler.cudagraph_mark_step_begin()": "2.1",
    }
    for code, release in samples.items():
        hits = [r for p, (r, _) in NEWER_APIS.items() if re.search(p, code)]
        assert hits == [release], (code, hits)
    assert not any(re.search(p, "torch.onnx.export(m, (x,), path, opset_version=17)") for p in NEWER_APIS)
