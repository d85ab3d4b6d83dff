"""The house rules, checked on the source: imports run one way, and the shipped package holds no tests.

Layers, top to bottom: ``ditstream`` itself (the CLI, ``commands/``, ``bench/``) → ``server/`` →
``engine/`` → ``trt_build/``. A module may import its own layer and the layers below, never above;
``clients/`` speaks the wire protocol only and imports none of them (and none of them imports it,
except the top). Function-level imports count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"ditstream": "ditstream", "server": "ditstream.server", "engine": "ditstream.engine",
           "trt_build": "ditstream.trt_build", "clients": "ditstream.clients"}
RANK = {"ditstream.trt_build": 1, "ditstream.engine": 2, "ditstream.server": 3, "ditstream": 4}


def _layer(module: str) -> str | None:
    for pkg in ("ditstream.trt_build", "ditstream.engine", "ditstream.server", "ditstream.clients"):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return "ditstream" if module == "ditstream" or module.startswith("ditstream.") else None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from ditstream.server import x`
    return names


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            out.append((pkg, path))
    return out


def test_imports_run_one_way():
    wrong = []
    for pkg, path in _modules():
        for name in _imports(path):
            target = _layer(name)
            if target is None or target == pkg:
                continue
            if pkg == "ditstream.clients" or (target == "ditstream.clients" and pkg != "ditstream"):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            elif pkg != "ditstream.clients" and target != "ditstream.clients" and RANK[target] > RANK[pkg]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name} (upwards)")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_shipped_package_holds_no_test_helpers():
    shipped = [p.relative_to(ROOT).as_posix() for _, p in _modules()]
    assert not [p for p in shipped if "test" in Path(p).name], shipped


def test_one_size_parser():
    """``WxH`` is parsed in one place (``engine/sizes.py``); no module splits sizes by hand."""
    import re

    by_hand = re.compile(r"""split\(\s*["']x["']\s*\)|\[xX×\]""")
    copies = [p.relative_to(ROOT).as_posix() for _, p in _modules()
              if by_hand.search(p.read_text()) and p.name != "sizes.py"]
    assert not copies, f"hand-rolled WxH parsing in {copies}: use ditstream.engine.sizes.parse_size"


def test_no_module_is_a_house_of_its_own():
    """One concept per file: no shipped module over ~400 lines (a bigger one is several concepts)."""
    big = {p.relative_to(ROOT).as_posix(): n for _, p in _modules()
           if (n := len(p.read_text().splitlines())) > 420}
    assert not big, f"split these by concern: {big}"
