"""TensorRT backend on the tiny pipeline: build, cache hit, parity, profile bounds, CUDA graphs.

These need the ``tensorrt`` package and a CUDA GPU and skip with that reason otherwise. What can be
checked without them (cache keys, atomic writes, the typed refusal on CPU) is in test_trt_cache.py
and test_backends.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ditstream.engine.config import BackendOptions

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_CUDA, reason="TensorRT tests need a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(not HAVE_TRT, reason="TensorRT tests need the tensorrt package (pip install tensorrt)"),
]

RESOLUTIONS = [(32, 32), (64, 48)]  # (width, height) pixels; the tiny VAE is 2x
BATCHES = [1, 4]
SEQ = 8


@pytest.fixture(scope="module")
def cuda_components(tiny_model_dir):
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components

    return load_components(ModelConfig(model=str(tiny_model_dir), device="cuda", dtype="fp32"))


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trt")


@pytest.fixture(scope="module")
def trt_backend(cuda_components, engine_dir):
    from ditstream.engine.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(cuda_components, BackendOptions(cache_dir=str(engine_dir), resolutions=RESOLUTIONS,
                                                          batches=BATCHES, seq_len=SEQ, opt_level=1))


@pytest.mark.parametrize("batch,width,height", [(1, 32, 32), (4, 64, 48), (3, 48, 32)])
def test_tensorrt_matches_torch(trt_backend, cuda_components, batch, width, height):
    from ditstream.engine.backends.torch_backend import TorchBackend
    from ditstream.trt_build.export import transformer_inputs

    ref = TorchBackend(cuda_components)
    f = cuda_components.vae_scale_factor
    x, t, ehs, mask, g = transformer_inputs(cuda_components.transformer, batch, height // f, width // f,
                                            seq_len=SEQ, device="cuda")
    got, want = trt_backend.denoise(x, t, ehs, mask, g), ref.denoise(x, t, ehs, mask, g)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 5e-3  # TF32 tactics are allowed in fp32 builds
    images = torch.rand(batch, 3, height, width, device="cuda") * 2 - 1
    assert (trt_backend.encode(images) - ref.encode(images)).abs().max().item() < 5e-3
    latents = torch.randn(batch, cuda_components.latent_channels, height // f, width // f, device="cuda")
    assert (trt_backend.decode(latents) - ref.decode(latents)).abs().max().item() < 5e-3


def _eager(backend, name, feeds_fn):
    runner = backend.runners[name]
    runner.cuda_graphs = False
    try:
        return feeds_fn()
    finally:
        runner.cuda_graphs = True


def test_two_shapes_captured_then_the_first_replayed_equals_eager(trt_backend, cuda_components):
    """Each captured shape owns its context: replaying A after capturing B still computes A."""
    c = cuda_components.latent_channels
    a = torch.randn(1, c, 16, 16, device="cuda")   # 32x32 px, batch 1
    b = torch.randn(4, c, 24, 32, device="cuda")   # 64x48 px, batch 4
    trt_backend.warmup([(1, 32, 32), (4, 48, 64)])  # captures A, then B (all three engines)
    runner = trt_backend.runners["vae_decoder"]
    assert {k[0][1] for k in runner.graphs} >= {tuple(a.shape), tuple(b.shape)}
    graphs_before = len(runner.graphs)
    got_b = trt_backend.decode(b)
    got_a = trt_backend.decode(a)      # replay of A after B was captured and replayed
    a2 = torch.randn_like(a)
    got_a2 = trt_backend.decode(a2)    # replay with new inputs
    assert len(runner.graphs) == graphs_before  # replays, no new capture
    want_a, want_b, want_a2 = (_eager(trt_backend, "vae_decoder", lambda t=t: trt_backend.decode(t))
                               for t in (a, b, a2))
    for got, want in ((got_a, want_a), (got_b, want_b), (got_a2, want_a2)):
        assert (got - want).abs().max().item() < 1e-5


def test_no_capture_outside_warmup(trt_backend, cuda_components):
    """A shape that was not warmed runs eagerly while serving: never a capture mid-tick."""
    runner = trt_backend.runners["vae_decoder"]
    before = dict(runner.graphs)
    latents = torch.randn(3, cuda_components.latent_channels, 16, 16, device="cuda")
    first, second = trt_backend.decode(latents), trt_backend.decode(latents)
    assert runner.graphs.keys() == before.keys() and torch.equal(first, second)


def test_capture_survives_cuda_work_on_another_thread(trt_backend, cuda_components):
    """Thread-local capture mode: another thread's CUDA calls during warm-up do not break it."""
    import threading

    stop = threading.Event()
    errors: list[BaseException] = []

    def busy():
        try:
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                while not stop.is_set():
                    torch.randn(256, 256, device="cuda").sum().item()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=busy)
    t.start()
    try:
        trt_backend.warmup([(2, 48, 64)])
    finally:
        stop.set()
        t.join()
    assert not errors
    latents = torch.randn(2, cuda_components.latent_channels, 24, 32, device="cuda")
    assert (trt_backend.decode(latents)
            - _eager(trt_backend, "vae_decoder", lambda: trt_backend.decode(latents))).abs().max().item() < 1e-5


def test_backend_runs_on_its_own_stream(trt_backend):
    assert trt_backend.stream.cuda_stream != 0  # not the legacy default stream
    assert all(r.stream is trt_backend.stream and r.scratch is trt_backend.scratch
               for r in trt_backend.runners.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the device guard needs a second GPU (cuda:1)")
def test_device_guard_runs_on_the_chosen_gpu(tiny_model_dir, tmp_path):
    from ditstream.engine.backends.tensorrt_backend import TensorRTBackend
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components
    from ditstream.trt_build.cache import EngineCache

    comps = load_components(ModelConfig(model=str(tiny_model_dir), device="cuda:1", dtype="fp32"))
    before = torch.cuda.current_device()
    backend = TensorRTBackend(comps, BackendOptions(cache_dir=str(tmp_path), resolutions=RESOLUTIONS,
                                                    batches=BATCHES, seq_len=SEQ, opt_level=1))
    backend.warmup([(1, 32, 32)])
    latents = torch.randn(1, comps.latent_channels, 16, 16, device="cuda:1")
    out = backend.decode(latents)
    assert out.device == torch.device("cuda:1") and torch.isfinite(out).all()
    assert torch.cuda.current_device() == before  # the guard restored the current device
    gpu = [e["spec"]["gpu"] for e in EngineCache(tmp_path).entries() if e["spec"]["kind"] == "tensorrt"]
    assert gpu and set(gpu) == {torch.cuda.get_device_name(1)}
    major, minor = torch.cuda.get_device_capability(1)
    assert {e["spec"]["compute_capability"] for e in EngineCache(tmp_path).entries()
            if e["spec"]["kind"] == "tensorrt"} == {f"{major}.{minor}"}


def test_second_backend_loads_from_cache(trt_backend, cuda_components, engine_dir, caplog):
    from ditstream.engine.backends.tensorrt_backend import TensorRTBackend

    with caplog.at_level("INFO", logger="ditstream.trt_build.build"):
        TensorRTBackend(cuda_components, BackendOptions(cache_dir=str(engine_dir), resolutions=RESOLUTIONS,
                                                       batches=BATCHES, seq_len=SEQ, opt_level=1))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("engine cache hit" in m for m in messages) == 3
    assert not any(m.startswith("building TensorRT engine") for m in messages)


def test_shape_outside_profile_is_an_error(trt_backend, cuda_components):
    from ditstream.engine.errors import GenerationError

    latents = torch.randn(8, cuda_components.latent_channels, 16, 16, device="cuda")  # batch 8 > max 4
    with pytest.raises(GenerationError, match="profile"):
        trt_backend.decode(latents)
    big = torch.randn(1, cuda_components.latent_channels, 64, 64, device="cuda")  # 128 px > max 64
    with pytest.raises(GenerationError, match="profile"):
        trt_backend.decode(big)
    with pytest.raises(GenerationError, match="outside the engine profile"):
        trt_backend.warmup([(8, 32, 32)])  # warm-up refuses before capturing anything


def test_fp16_transformer_engine_has_no_nan(tiny_model_dir, tmp_path):
    """Strongly typed fp16 build: RMSNorm and linear attention stay fp32, so no NaN/inf."""
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components
    from ditstream.trt_build.build import get_or_build_engine
    from ditstream.trt_build.cache import BuildProfile, EngineCache

    comps = load_components(ModelConfig(model=str(tiny_model_dir), device="cuda", dtype="fp16"))
    profile = BuildProfile.from_request(RESOLUTIONS, BATCHES, seq_len=SEQ)
    path = get_or_build_engine(comps, "transformer", profile, cache=EngineCache(tmp_path), opt_level=1)
    assert path.is_file() and EngineCache(tmp_path).sidecar(path).is_file()

    import tensorrt as trt
    from ditstream.engine.backends.tensorrt_backend import _Runner
    from ditstream.trt_build.export import transformer_inputs

    runner = _Runner(trt, path, torch.device("cuda"), cuda_graphs=False)
    x, t, ehs, mask, g = transformer_inputs(comps.transformer, 4, 24, 32, seq_len=SEQ, device="cuda")
    out = runner({"sample": x * 100, "timestep": t, "encoder_hidden_states": ehs, "encoder_attention_mask": mask,
                  "guidance": g})  # large inputs: x² in fp16 would overflow
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
