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


# ------------------------------------------------------------------------------ sizes of classes and functions
#: A class's lines counting the in-repo classes it inherits from (mixins spread over files count).
CLASS_LIMIT = 420
#: A function's lines, decorators excluded, nested functions included.
FUNCTION_LIMIT = 80
#: Offenders of the day, each allowed only at its present size or smaller; remove an entry when its
#: owner is cut below the limit (the test says so). Never add one: split the class or function.
KNOWN_BIG_CLASSES: dict[str, int] = {}
KNOWN_LONG_FUNCTIONS: dict[str, int] = {}


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]


def _definitions(modules: list[tuple[str, Path]]) -> tuple[dict[str, int], dict[str, tuple[int, list[str]]]]:
    """``path:qualname`` → lines for every function, and for every class its own lines and base names."""
    functions: dict[str, int] = {}
    classes: dict[str, tuple[int, list[str]]] = {}

    def visit(node: ast.AST, where: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if isinstance(child, ast.ClassDef):
                    bases = [ast.unparse(b).rsplit(".", 1)[-1].split("[", 1)[0] for b in child.bases]
                    classes[f"{where}:{name}"] = (_lines(child), bases)
                else:
                    functions[f"{where}:{name}"] = _lines(child)
                visit(child, where, name + ".")
            else:
                visit(child, where, prefix)

    for _, path in modules:
        visit(ast.parse(path.read_text()), path.relative_to(ROOT).as_posix(), "")
    return functions, classes


def _class_sizes(classes: dict[str, tuple[int, list[str]]]) -> dict[str, int]:
    """Each class's lines plus, recursively, those of its in-repo bases (found by name; where two
    classes share a name, the bigger counts), each base counted once."""
    by_name: dict[str, str] = {}
    for key in sorted(classes, key=lambda k: classes[k][0]):
        by_name[key.rsplit(":", 1)[1].rsplit(".", 1)[-1]] = key

    def total(key: str, seen: set[str]) -> int:
        if key in seen:
            return 0
        seen.add(key)
        lines, bases = classes[key]
        return lines + sum(total(by_name[b], seen) for b in bases if b in by_name)

    return {key: total(key, set()) for key in classes}


def _over(sizes: dict[str, int], limit: int, known: dict[str, int]) -> list[str]:
    """What breaks the limit beyond the known offenders, and known entries that grew or went stale."""
    wrong = [f"{k}: {n} lines (limit {limit})" for k, n in sorted(sizes.items()) if n > limit and k not in known]
    for k, was in known.items():
        now = sizes.get(k, 0)
        if now > was:
            wrong.append(f"{k}: grew to {now} lines (a known offender at {was}; it may only shrink)")
        elif now <= limit:
            wrong.append(f"{k}: now {now} lines, within the limit: remove it from the known offenders")
    return wrong


def test_no_class_over_400_lines_counting_what_it_inherits():
    """A class spread over mixins in several files is still one class: ~400 lines at most, all counted."""
    _, classes = _definitions(_modules())
    wrong = _over(_class_sizes(classes), CLASS_LIMIT, KNOWN_BIG_CLASSES)
    assert not wrong, "split these classes into composed parts:\n" + "\n".join(wrong)


def test_no_function_over_80_lines():
    functions, _ = _definitions(_modules())
    wrong = _over(functions, FUNCTION_LIMIT, KNOWN_LONG_FUNCTIONS)
    assert not wrong, "split these functions:\n" + "\n".join(wrong)


# ------------------------------------------------------------------------------ types, not probes
#: The getattr/hasattr calls ``server/`` may make: none on engine objects (``EngineStream`` and
#: friends declare what they offer). Each entry is (file, call as ``ast.unparse`` writes it).
PROBES_ALLOWED = {
    # Starlette's matched route: a Mount or a Route, only the latter has a path template.
    ("server/api/middleware.py", "getattr(route, 'path', None)"),
    # aiortc's RTCRtpReceiver: whether our jitter-buffer patch is already installed on it.
    ("server/live/webrtc_jitter.py", "hasattr(receiver, _ATTRIBUTE)"),
}
#: Probes on engine objects still there; they may only go (the test says when one has gone).
KNOWN_PROBES: set[tuple[str, str]] = set()


def _probes(folder: str = "server") -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr")):
                found.add((path.relative_to(ROOT).as_posix(), ast.unparse(node)))
    return found


def test_no_getattr_or_hasattr_probes_in_the_server():
    """The server knows the types it holds: a probe on an engine object hides a missing interface."""
    found = _probes()
    new = sorted(found - PROBES_ALLOWED - KNOWN_PROBES)
    gone = sorted((KNOWN_PROBES | PROBES_ALLOWED) - found)
    assert not new, f"getattr/hasattr in server/ (declare the attribute on the type instead): {new}"
    assert not gone, f"no longer in server/: remove from PROBES_ALLOWED / KNOWN_PROBES: {gone}"
