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


def test_cuda_graph_replay_equals_eager(trt_backend, cuda_components):
    latents = torch.randn(2, cuda_components.latent_channels, 16, 16, device="cuda")
    first = trt_backend.decode(latents)   # eager
    second = trt_backend.decode(latents)  # eager run, then captured
    other = torch.randn_like(latents)
    replay_other = trt_backend.decode(other)  # replay with new inputs
    assert trt_backend.runners["vae_decoder"].graphs, "no CUDA graph was captured"
    assert torch.equal(first, second)
    trt_backend.runners["vae_decoder"].cuda_graphs = False
    try:
        assert (replay_other - trt_backend.decode(other)).abs().max().item() < 1e-5
    finally:
        trt_backend.runners["vae_decoder"].cuda_graphs = True


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
