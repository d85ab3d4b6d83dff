"""The gateway and the worker are small composed parts: no mixins, no class over ~300 lines, one
owner for every counter (bumped under a lock, never by hand), Redis's connection errors named once,
and the worker's docstring names the threads it starts."""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path

import pytest
from ditstream.server.scale.counters import Counters

SCALE = Path(__file__).resolve().parent.parent / "server" / "scale"
#: Bases a class in server/scale may have: data and message types, errors, nothing that adds behaviour.
ALLOWED_BASES = {"Msg", "BaseModel", "DitstreamError", "Exception"}


def _classes() -> list[tuple[str, ast.ClassDef]]:
    return [(p.name, node) for p in sorted(SCALE.glob("*.py"))
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef)]


def test_no_mixins_and_no_big_classes():
    mixed = [f"{f}:{c.name}({', '.join(ast.unparse(b) for b in c.bases)})" for f, c in _classes()
             if any(ast.unparse(b) not in ALLOWED_BASES for b in c.bases)]
    assert not mixed, f"composition, not inheritance: {mixed}"
    big = {f"{f}:{c.name}": n for f, c in _classes() if (n := c.end_lineno - c.lineno + 1) > 300}
    assert not big, f"split these into parts: {big}"


def test_counters_are_only_bumped_through_their_owner():
    """``counters[name] += n`` from several threads loses counts; ``Counters.add`` takes its lock."""
    by_hand = [f"{p.name}:{node.lineno}" for p in SCALE.glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript)
               and "counters" in ast.unparse(node.target.value)]
    assert not by_hand, f"bump counters with Counters.add: {by_hand}"


def test_counters_count_exactly_from_many_threads_and_refuse_unknown_names():
    c = Counters(["frames", "seconds"])

    def bump() -> None:
        for _ in range(2000):
            c.add("frames")
            c.add("seconds", 0.5)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.snapshot() == {"frames": 16000, "seconds": 8000.0}
    with pytest.raises(KeyError):
        c.add("frame")  # misspelt: fails loudly instead of counting nowhere


def test_redis_connection_errors_are_named_once():
    defs = [f"{p.name}:{node.name}" for p in SCALE.glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.FunctionDef) and "conn_errors" in node.name]
    assert defs == ["config.py:conn_errors"], defs


def test_the_worker_starts_the_threads_its_docstring_names(redis_url: str):
    from ditstream.engine.config import EngineConfig
    from ditstream.engine.null import null_runner
    from ditstream.server.scale import worker as worker_module
    from ditstream.server.scale.config import ScaleConfig
    from ditstream.server.scale.worker import Worker

    before = set(threading.enumerate())
    w = Worker(null_runner(EngineConfig()), ScaleConfig(redis_url=redis_url, prefix="threads-test"),
               worker_id="threads").start()
    try:
        started = sorted(t.name.removeprefix("ditstream-worker-") for t in set(threading.enumerate()) - before
                         if t.name.startswith("ditstream-worker-"))
    finally:
        w.stop(drain_s=0)
    doc = worker_module.__doc__ or ""
    assert sorted(re.findall(r"[Tt]hread\s+\*\*(\w+)\*\*", doc)) == started, (started, doc)
    words = {3: "Three", 4: "Four", 5: "Five", 6: "Six"}
    assert f"{words[len(started)]} threads" in doc
