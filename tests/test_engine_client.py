"""One interface for an engine: the in-process runner and the Redis gateway both implement it fully,
and the server code talks to it without probing which one it holds."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from ditstream.engine.null import null_runner
from ditstream.engine.runner import StreamHandle
from ditstream.server.engine_client import EngineClient, EngineStream
from ditstream.server.scale.gateway import GatewayStreamHandle, RedisGatewayRunner

ROOT = Path(__file__).resolve().parent.parent


def _members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


def _instances():
    from ditstream.engine.config import StreamConfig
    from ditstream.server.scale.config import ScaleConfig

    runner = null_runner()  # not started: nothing runs, every member exists
    gateway = RedisGatewayRunner(ScaleConfig(redis_url="redis://127.0.0.1:1/0"))  # redis-py connects lazily
    cfg = StreamConfig(prompt="x", width=64, height=64)
    state = runner.core.add(cfg)
    return [(runner, EngineClient), (gateway, EngineClient), (StreamHandle(runner, state), EngineStream),
            (GatewayStreamHandle(gateway.sessions, "s1", cfg, None), EngineStream)]


def test_both_engines_implement_every_member():
    for obj, protocol in _instances():
        name = type(obj).__name__
        missing = [n for n in _members(protocol) if not hasattr(obj, n)]
        assert not missing, f"{name} lacks {missing}"
        for member_name, member in vars(protocol).items():
            if callable(member) and not member_name.startswith("_"):
                want = list(inspect.signature(member).parameters)[1:]  # without self
                have = list(inspect.signature(getattr(obj, member_name)).parameters)
                assert have[: len(want)] == want, f"{name}.{member_name}{have} is not {protocol.__name__}{want}"
        assert isinstance(obj, protocol)


def test_a_live_runner_is_an_engine_client():
    runner = null_runner().start()
    try:
        assert isinstance(runner, EngineClient)
        runner.wait_ready(30)
        assert runner.ready and runner.workers_up == 1 and runner.warming == []
        from ditstream.engine.config import StreamConfig

        handle = runner.add_stream(StreamConfig(prompt="x", width=64, height=64))
        assert isinstance(handle, EngineStream)
        handle.close()
    finally:
        runner.stop()


def test_server_code_never_probes_the_engine():
    """No ``hasattr``/``getattr`` on the engine or its stream handles in server/: each is one type
    (``EngineClient``, ``EngineStream``), used as such; what a relaying handle offers is declared."""
    found = []
    for path in (ROOT / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
                target = ast.unparse(node.args[0]) if node.args else ""
                if any(word in target for word in ("runner", "engine", "handle", "stream")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_server_code_writes_nothing_onto_a_stream_handle():
    """A handle's state is its own: the server asks (``code_outputs``), it does not set attributes."""
    found = []
    for path in (ROOT / "server" / "live").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and "handle" in ast.unparse(t.value):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_both_engines_take_their_limits_from_one_place():
    """The gateway refuses what the engine would (pixels, prompt length) because both read
    ``Settings.engine_config()``; two hand-built copies drifted once (the gateway's lacked batching)."""
    from ditstream.server.api.factory import load_runner
    from ditstream.server.settings import Settings

    s = Settings(model="null", max_pixels=128 * 128, max_prompt_chars=77, max_batch=3, output_queue_size=5,
                 batch_wait=0.004)
    engine = load_runner(s)
    gateway = load_runner(s.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))  # connects lazily
    assert isinstance(gateway, RedisGatewayRunner)
    assert engine.engine_config == gateway.engine_config == s.engine_config()
    assert s.engine_config().batching.max_wait == 0.004 and s.engine_config().max_pixels == 128 * 128
