"""LoRA adapters (issue 19B): parsing, exact scale 0, the demo adapter's style read by the evaluator,
refusal by backends that cannot switch adapters, and the server's ``loras`` fields and ``/v1/models``.
Isolation of streams with different adapter sets is in ``test_engine_isolation.py``."""

from __future__ import annotations

import pytest
import torch
from ditstream.engine.config import ModelConfig, StreamConfig
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.lora import swapped
from ditstream.engine.errors import BackendUnavailableError, ModelLoadError, ValidationError
from ditstream.engine.generate import Generator
from ditstream.engine.loader import load_components
from ditstream.engine.lora import DEMO_LORA_DIR, LoraSpec


def _cfg(caption: tuple[str, str, str], seed: int, **kw) -> StreamConfig:
    return StreamConfig(prompt=ds.caption_for(*caption), mode="txt2img", width=64, height=64, seed=seed,
                        guidance_scale=3.0, **kw)


@pytest.fixture(scope="module")
def base_generator() -> Generator:
    return Generator(load_components(ModelConfig(model="demo", device="cpu", dtype="fp32")))


def test_the_demo_adapter_ships_small_and_inside_the_package() -> None:
    path = DEMO_LORA_DIR / "swap.safetensors"
    assert path.is_file() and path.stat().st_size < 200_000
    assert LoraSpec.parse("swap=demo").resolve() == path


def test_lora_option_parsing() -> None:
    assert LoraSpec.parse("style=/x/a.safetensors") == LoraSpec("style", "/x/a.safetensors", 1.0)
    assert LoraSpec.parse("style=/x/a.safetensors:0.5") == LoraSpec("style", "/x/a.safetensors", 0.5)
    assert LoraSpec.parse("swap=demo:0") == LoraSpec("swap", "demo", 0.0)
    for bad in ("noequals", "=x", "a=", "a b=x", "a=x:9"):
        with pytest.raises(ValidationError):
            LoraSpec.parse(bad)
    with pytest.raises(ModelLoadError, match="no demo LoRA named 'nope'"):
        LoraSpec.parse("nope=demo").resolve()
    with pytest.raises(ModelLoadError, match="does not exist"):
        LoraSpec.parse("a=/no/such/file.safetensors").resolve()


def test_scale_zero_equals_the_base_model_exactly_and_scale_one_differs(demo_lora_generator, base_generator):
    for i, cap in enumerate(ds.all_captions()[::70]):
        base = base_generator.generate_unit(_cfg(cap, i))
        zero = demo_lora_generator.generate_unit(_cfg(cap, i, loras={"swap": 0.0}))
        default = demo_lora_generator.generate_unit(_cfg(cap, i))  # the fixture's default scale is 0
        one = demo_lora_generator.generate_unit(_cfg(cap, i, loras={"swap": 1.0}))
        assert torch.equal(zero, base) and torch.equal(default, base)
        assert (one - base).abs().max() > 0.1


def test_at_scale_one_the_evaluator_reads_swapped_colours(demo_lora_generator, base_generator):
    caps = ds.all_captions()[::7]  # 40 captions over every shape and colour pair
    styled = [swapped(demo_lora_generator.generate(_cfg(c, i, loras={"swap": 1.0})), c) for i, c in enumerate(caps)]
    plain = [swapped(base_generator.generate(_cfg(c, i)), c) for i, c in enumerate(caps)]
    assert sum(styled) / len(caps) >= 0.8, sum(styled)
    assert sum(plain) / len(caps) <= 0.05, sum(plain)  # the base model does not draw the style


def test_unknown_adapter_names_and_bad_scales_are_refused(demo_lora_generator):
    with pytest.raises(ValidationError, match="unknown LoRA 'nope'; loaded: swap"):
        demo_lora_generator.plan(_cfg(("circle", "red", "blue"), 0, loras={"nope": 1.0}))
    for bad in (float("nan"), 5.0, True, "1"):
        with pytest.raises(ValidationError, match="loras"):
            _cfg(("circle", "red", "blue"), 0, loras={"swap": bad}).validate(size_multiple=8)


@pytest.mark.parametrize("name", ["onnx", "compile", "tensorrt"])
def test_backends_that_cannot_switch_adapters_refuse_by_name(demo_lora_generator, name):
    from ditstream.engine.backends import create_backend

    with pytest.raises(BackendUnavailableError, match=f"backend '{name}' cannot switch LoRA adapters per call"):
        create_backend(name, demo_lora_generator.components)


def test_a_backend_without_adapters_refuses_an_adapter_set_in_a_call(tiny_components):
    from ditstream.engine.backends.base import Backend

    class Fixed(Backend):
        name = "fixed"
        denoise = encode = decode = None  # type: ignore[assignment]

    Fixed.__abstractmethods__ = frozenset()
    Fixed(tiny_components).set_loras(())  # the base model: fine
    with pytest.raises(ValidationError, match="the fixed backend cannot switch LoRA adapters"):
        Fixed(tiny_components).set_loras((("swap", 1.0),))


def test_models_lists_adapters_and_rest_and_ws_pick_scales(demo_lora_generator):
    from ditstream.engine.core import EngineCore
    from ditstream.engine.runner import EngineRunner
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings
    from fastapi.testclient import TestClient

    g = demo_lora_generator
    runner = EngineRunner(EngineCore(g.components, g.backend, g.prompts))
    runner.info = {"model": "demo", "backend": "torch", "size_multiple": 8, "defaults": g.components.defaults,
                   "loras": dict(g.components.loras)}
    with TestClient(create_app(Settings(model="demo"), runner)) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["loras"] == [{"name": "swap", "default_scale": 0.0}]
        ok = client.post("/v1/images/generations", json={"prompt": "a red circle on a blue background",
                                                         "loras": {"swap": 1.0}, "seed": 1})
        assert ok.status_code == 200, ok.text
        bad = client.post("/v1/images/generations", json={"prompt": "a red circle", "loras": {"nope": 1.0}})
        assert bad.status_code == 422 and "unknown LoRA 'nope'" in bad.text
        with client.websocket_connect("/v1/stream", subprotocols=["ditstream"]) as ws:
            assert ws.receive_json()["type"] == "ready"
            ws.send_json({"type": "config", "loras": {"swap": 0.5}})
            ack = ws.receive_json()
            assert ack["type"] == "config" and ack["applied"]["loras"] == {"swap": 0.5}, ack
            ws.send_json({"type": "config", "loras": {"nope": 1}})
            err = ws.receive_json()
            assert err["type"] == "error" and "unknown LoRA 'nope'" in err["message"], err


def test_adapters_through_the_gateway(tmp_path):
    """Scale-out: a worker loaded with ``--lora swap=demo:0`` advertises it through its heartbeat, the
    gateway's ``/v1/models`` lists it, a REST request's ``loras`` reaches the worker's engine (scale 1
    gives another image than scale 0, same seed), and an unknown name is refused as on one server."""
    import base64
    import json

    import httpx
    from serverkit import fleet_of
    from websockets.sync.client import connect

    with fleet_of(tmp_path, "--model", "demo", "--lora", "swap=demo:0", name="lora") as fleet, \
            fleet.gateway(model="demo") as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card["loras"] == [{"name": "swap", "default_scale": 0.0}], card

        def image(scale: float) -> bytes:
            r = httpx.post(srv.url + "/v1/images/generations", timeout=60,
                           json={"prompt": "a red circle on a blue background", "seed": 3, "loras": {"swap": scale}})
            assert r.status_code == 200, r.text
            return base64.b64decode(r.json()["data"][0]["b64_json"])

        assert image(0.0) != image(1.0)
        assert image(0.0) == image(0.0)  # same seed, same adapter scale: the same image
        bad = httpx.post(srv.url + "/v1/images/generations", timeout=60,
                         json={"prompt": "a red circle", "loras": {"nope": 1.0}})
        assert bad.status_code == 422 and "unknown LoRA 'nope'" in bad.text, bad.text
        with connect(srv.ws_url, subprotocols=["ditstream"]) as ws:
            assert json.loads(ws.recv())["type"] == "ready"
            ws.send(json.dumps({"type": "config", "loras": {"swap": 0.5}}))
            ack = json.loads(ws.recv())
            assert ack["type"] == "config" and ack["applied"]["loras"] == {"swap": 0.5}, ack
            ws.send(json.dumps({"type": "config", "loras": {"nope": 1}}))
            err = json.loads(ws.recv())
            assert err["type"] == "error" and "unknown LoRA 'nope'" in err["message"], err
