"""Shared fixtures: a tiny real-class SANA-Sprint pipeline saved in diffusers layout, and loaders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Backends the engine's parity and isolation tests run on (accelerated backends add themselves).
ENGINE_BACKENDS = ["torch", "onnx", pytest.param("compile", marks=pytest.mark.slow)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """diffusers' own tiny test configuration of the real classes, random weights, saved and reloadable."""
    from ditstream.engine.synthetic import make_pipeline_folder

    return make_pipeline_folder(tmp_path_factory.mktemp("tiny") / "pipe", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_components(tiny_model_dir: Path):
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components

    return load_components(ModelConfig(model=str(tiny_model_dir)))


@pytest.fixture(params=ENGINE_BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_generator(tiny_components, backend_name: str):
    """A sequential generator on the tiny model with the backend under test."""
    from ditstream.engine.backends import create_backend
    from ditstream.engine.generate import Generator

    return Generator(tiny_components, create_backend(backend_name, tiny_components))


@pytest.fixture(scope="session")
def demo_lora_generator():
    """The demo model with its shipped LoRA ``swap`` loaded at default scale 0 (torch backend)."""
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.generate import Generator
    from ditstream.engine.lora import LoraSpec

    return Generator.from_config(ModelConfig(model="demo", device="cpu", dtype="fp32",
                                             loras=(LoraSpec("swap", "demo", 0.0),)))


@pytest.fixture(scope="session")
def demo_stream_server():
    """The demo model served on loopback (in-process engine, real uvicorn), shared by the client studio
    tests (``test_client_osc.py``, ``test_client_ndi.py``) so the model loads once for both."""
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.runner import EngineRunner
    from ditstream.server.api.app import create_app
    from ditstream.server.settings import Settings

    from ditstream.bench.harness import ServerThread

    runner = EngineRunner.from_config(ModelConfig(model="demo", device="cpu", dtype="fp32"))
    with ServerThread(create_app(Settings(model="demo"), runner)) as srv:
        yield srv


# Fleets behind the "gateway" parametrisation of the REST/WS suites (tests/serverkit.py): a private
# redis-server and one `ditstream worker` each, started the first time a gateway test needs them.
@pytest.fixture(scope="session")
def tiny_fleet(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from serverkit import fleet_of

    with fleet_of(tmp_path_factory.mktemp("tiny-fleet"), "--model", str(tiny_model_dir), name="tiny") as fleet:
        yield fleet


@pytest.fixture(scope="session")
def null_fleet(tmp_path_factory: pytest.TempPathFactory):
    from serverkit import fleet_of

    with fleet_of(tmp_path_factory.mktemp("null-fleet"), "--model", "null", name="null") as fleet:
        yield fleet


@pytest.fixture(scope="session")
def slow_null_fleet(tmp_path_factory: pytest.TempPathFactory):
    from serverkit import SLOW_DELAY_S, fleet_of

    with fleet_of(tmp_path_factory.mktemp("slow-fleet"), "--model", "null", "--null-delay-ms",
                  str(SLOW_DELAY_S * 1e3), name="slow") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real loopback ``redis-server`` per test module (tests isolate themselves by key prefix)."""
    from ditstream.bench.scale_harness import RedisServer, redis_server_binary

    if redis_server_binary() is None:  # the CI installs it: say so rather than skip silently
        pytest.fail("redis-server is required (apt-get install -y redis-server)", pytrace=False)
    with RedisServer(log_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def no_tf32():
    """TF32 off for the test (CUDA matmuls and convolutions in full fp32): the gpu parity tests compare
    CUDA against the CPU at fp32 tolerances that TF32's 10-bit mantissa would break."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
