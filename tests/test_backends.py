"""The ``onnx`` and ``compile`` backends against the eager ``torch`` reference on the tiny pipeline.

The engine's own parity and isolation suites (tests/test_engine_*.py) run on these backends too
through the ``backend_name`` fixture; this file checks the backend contract directly (same
numbers at several shapes, per-row independence, typed failures instead of silent fallbacks).
"""

from __future__ import annotations

import sys

import pytest
import torch
from ditstream.engine.backends import create_backend
from ditstream.engine.backends.compile_backend import bucket_for
from ditstream.engine.config import BackendOptions
from ditstream.engine.errors import BackendUnavailableError
from ditstream.trt_build.export import transformer_inputs

SHAPES = [(1, 32, 32), (3, 48, 64)]  # (batch, height, width) pixels


@pytest.fixture(scope="module")
def reference(tiny_components):
    return create_backend("torch", tiny_components)


@pytest.fixture(scope="module")
def onnx_backend(tiny_components, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the 'test' extra")
    from ditstream.engine.backends.onnx_backend import OnnxBackend

    return OnnxBackend(tiny_components, BackendOptions(cache_dir=str(tmp_path_factory.mktemp("engines"))))


@pytest.fixture(scope="module")
def compile_backend(tiny_components):
    return create_backend("compile", tiny_components)


def _check_parity(backend, reference, components, batch, h, w, tol):
    f = components.vae_scale_factor
    x, t, ehs, mask, guidance = transformer_inputs(components.transformer, batch, h // f, w // f, seed=h + batch)
    got, want = backend.denoise(x, t, ehs, mask, guidance), reference.denoise(x, t, ehs, mask, guidance)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got - want).abs().max().item() < tol
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    got, want = backend.encode(images), reference.encode(images)
    assert got.shape == want.shape and (got - want).abs().max().item() < tol
    latents = torch.randn(batch, components.latent_channels, h // f, w // f)
    got, want = backend.decode(latents), reference.decode(latents)
    assert got.shape == want.shape and (got - want).abs().max().item() < tol


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_{}x{}".format(*s))
def test_onnx_matches_torch(onnx_backend, reference, tiny_components, shape):
    _check_parity(onnx_backend, reference, tiny_components, *shape, tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_{}x{}".format(*s))
def test_compile_matches_torch(compile_backend, reference, tiny_components, shape):
    _check_parity(compile_backend, reference, tiny_components, *shape, tol=1e-4)


def test_onnx_rows_are_independent(onnx_backend, tiny_components):
    """A row's result does not depend on the other rows in its batch (cross-stream isolation)."""
    x, t, ehs, mask, g = transformer_inputs(tiny_components.transformer, 3, 16, 16, seed=7)
    t = torch.tensor([0.2, 0.5, 0.9])
    g = torch.tensor([1.0, 4.5, 8.0])
    together = onnx_backend.denoise(x, t, ehs, mask, g)
    for i in range(3):
        alone = onnx_backend.denoise(x[i:i + 1], t[i:i + 1], ehs[i:i + 1], mask[i:i + 1], g[i:i + 1])
        assert (together[i:i + 1] - alone).abs().max().item() < 1e-5


def test_onnx_export_is_cached(tiny_components, tmp_path, caplog):
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the 'test' extra")
    from ditstream.engine.backends.onnx_backend import OnnxBackend

    OnnxBackend(tiny_components, BackendOptions(cache_dir=str(tmp_path)))
    assert len(list(tmp_path.glob("*.onnx.json"))) == 3
    with caplog.at_level("INFO", logger="ditstream.trt_build.export"):
        OnnxBackend(tiny_components, BackendOptions(cache_dir=str(tmp_path)))
    assert sum("onnx cache hit" in r.getMessage() for r in caplog.records) == 3


def test_named_onnx_backend_without_onnxruntime_raises(tiny_components, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails
    with pytest.raises(BackendUnavailableError, match="onnxruntime"):
        create_backend("onnx", tiny_components)


def test_onnx_refuses_bf16(tiny_components, monkeypatch):
    from ditstream.engine.backends.onnx_backend import OnnxBackend

    monkeypatch.setattr(tiny_components, "dtype", torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bf16"):
        OnnxBackend(tiny_components)


def test_tensorrt_backend_without_tensorrt_or_cuda_raises(tiny_components):
    """On this CPU model the tensorrt backend must refuse with a reason, never fall back to torch."""
    with pytest.raises(BackendUnavailableError, match=r"tensorrt|CUDA"):
        create_backend("tensorrt", tiny_components)


def test_batch_buckets():
    assert [bucket_for(b) for b in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 33]
    assert bucket_for(3, (4, 12)) == 4 and bucket_for(5, (4, 12)) == 12


def test_gpu_bench_machinery_on_the_tiny_model(tmp_path):
    """The bench's loop, baseline, table and JSON on CPU with the tiny architecture (the GPU run is manual)."""
    import json

    from ditstream.bench.gpu import run_gpu_bench
    from ditstream.bench.gpu_timing import format_table, to_json

    result = run_gpu_bench(arch="tiny", device="cpu", dtype="fp32", resolutions=(32,), batches=(1, 2),
                           backends=("torch", "onnx", "tensorrt"), min_time=0.0, cache_dir=str(tmp_path))
    by = {(r.backend, r.batch): r for r in result.rows}
    assert {b for b, _ in by} == {"diffusers", "torch", "onnx", "tensorrt", "diffusers-end"}
    for name in ("diffusers", "torch", "onnx", "diffusers-end"):
        row = by[(name, 2)]
        assert row.status == "ok" and row.fps > 0 and row.calls >= 10
        assert row.seconds_per_call <= row.p90_s
    assert by[("torch", 2)].max_abs_err == 0.0  # torch against itself
    assert by[("onnx", 2)].max_abs_err < 1e-3
    assert by[("onnx", 1)].speedup_vs_diffusers > 0
    assert by[("tensorrt", 1)].status == "unavailable" and "tensorrt" in by[("tensorrt", 1)].note
    assert result.tflop_per_frame[32] > 0
    assert result.info["versions"]["torch"] == torch.__version__ and result.info["complete"]
    assert "diffusers" in format_table(result)
    assert json.loads(to_json(result))["rows"][0]["backend"] == "diffusers"


def test_gpu_bench_default_grid_is_the_tensorrt_profile():
    from ditstream.trt_build.cache import BuildProfile

    from ditstream.bench.gpu import DEFAULT_GRID, _profile_of, bench_grid

    assert bench_grid() == [(512, 1), (512, 4), (1024, 1)] == list(DEFAULT_GRID)
    sizes, batches = _profile_of(bench_grid())
    profile = BuildProfile.from_request([(s, s) for s in sizes], batches)
    assert profile.batch == (1, 1, 4) and profile.height == profile.width == (512, 512, 1024)
    assert bench_grid([256], [1, 2]) == [(256, 1), (256, 2)]


class _FakeBackend:
    """Stands in for an accelerated backend: torch underneath, a warm-up that can hang."""

    def __init__(self, components, hang=None, hanging=None):
        from ditstream.engine.backends.torch_backend import TorchBackend

        self._inner = TorchBackend(components)
        self.dtype = components.dtype
        self.hang, self.hanging = hang, hanging

    def warmup(self, shapes):
        if self.hanging is not None:
            self.hanging.set()
        if self.hang is not None:
            assert self.hang.wait(30), "the watchdog never fired"

    def denoise(self, *args):
        return self._inner.denoise(*args)

    def encode(self, images):
        return self._inner.encode(images)

    def decode(self, latents):
        return self._inner.decode(latents) + 0.5  # a wrong output: the check must see it


def test_gpu_bench_writes_json_after_every_row(tmp_path):
    import json

    from ditstream.bench.gpu import run_gpu_bench

    out = tmp_path / "bench.json"
    seen: list[int] = []

    def progress(msg):  # after each row's message, the file already holds that row
        if out.exists():
            seen.append(len(json.loads(out.read_text())["rows"]))

    result = run_gpu_bench(arch="tiny", device="cpu", dtype="fp32", grid=[(32, 1), (64, 2)], backends=("fake",),
                           min_time=0.0, json_out=out, progress=progress,
                           backend_factory=lambda name, comps, *a, **k: _FakeBackend(comps))
    assert seen == sorted(seen) and seen[-1] == len(result.rows) == 6  # diffusers, fake, diffusers-end
    final = json.loads(out.read_text())
    assert final["info"]["complete"] and len(final["rows"]) == 6
    fake = [r for r in final["rows"] if r["backend"] == "fake"]
    assert all(r["max_abs_err"] >= 0.49 and "differs from torch" in r["note"] for r in fake)


def test_gpu_bench_watchdog_keeps_the_rows_and_ends_a_hung_run(tmp_path):
    import json
    import threading

    from ditstream.bench.gpu import run_gpu_bench

    out = tmp_path / "bench.json"
    release, hanging = threading.Event(), threading.Event()
    at_fire: dict = {}

    def on_watchdog():  # instead of os._exit: record what the file held, then unblock the hung warm-up
        # On a loaded machine the deadline may pass while the baseline still runs (it did, at load 8):
        # what must survive is what was measured before the hang, so read the file once it hangs.
        assert hanging.wait(60), "the fake backend never began its warm-up"
        at_fire.update(json.loads(out.read_text()))
        release.set()

    result = run_gpu_bench(arch="tiny", device="cpu", dtype="fp32", grid=[(32, 1)], backends=("fake",),
                           min_time=0.0, json_out=out, watchdog_s=2.0, on_watchdog=on_watchdog,
                           backend_factory=lambda name, comps, *a, **k: _FakeBackend(comps, release, hanging))
    assert release.is_set()
    assert "watchdog" in at_fire["info"] and not at_fire["info"]["complete"]
    assert [r["backend"] for r in at_fire["rows"]] == ["diffusers"]  # the baseline survived the hang
    assert not result.info["complete"]


def test_watchdog_calls_back_only_after_its_deadline():
    import time

    from ditstream.bench.gpu_timing import Watchdog

    notes: list[str] = []
    fired: list[bool] = []
    dog = Watchdog(time.monotonic() + 60, notes.append, lambda: fired.append(True), poll_s=0.01).start()
    time.sleep(0.1)
    dog.stop()
    assert not fired and not notes
    dog = Watchdog(time.monotonic(), notes.append, lambda: fired.append(True), poll_s=0.01).start()
    time.sleep(0.2)
    dog.stop()
    assert fired == [True] and "watchdog" in notes[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_refuses_without_cuda():
    from typer.testing import CliRunner

    from ditstream.cli import app

    result = CliRunner().invoke(app, ["bench", "gpu"])
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.output


def test_auto_picks_onnx_on_cpu_and_says_why(tiny_components, monkeypatch, caplog, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the 'test' extra")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level("INFO", logger="ditstream.engine.backends"):
        assert create_backend("auto", tiny_components).name == "onnx"
    assert "backend auto -> onnx: fastest available" in caplog.text

    caplog.clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with caplog.at_level("INFO", logger="ditstream.engine.backends"):
        assert create_backend("auto", tiny_components).name == "torch"
    assert "skipped onnx:" in caplog.text and "onnxruntime" in caplog.text


def test_bucket_padding_does_not_change_any_row(tiny_components, reference):
    """Batch 3 padded to bucket 4 (as on GPU with CUDA graphs) returns exactly the 3 real rows."""
    from ditstream.engine.backends.compile_backend import CompileBackend

    padded = CompileBackend(tiny_components, compile_backend="eager", pad_to_buckets=True)
    assert padded.buckets and padded._bucket(3) == 4
    x, t, ehs, mask, g = transformer_inputs(tiny_components.transformer, 3, 16, 12, seed=3)
    t, g = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([2.0, 4.5, 7.0])
    got, want = padded.denoise(x, t, ehs, mask, g), reference.denoise(x, t, ehs, mask, g)
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5
    latents = torch.randn(3, tiny_components.latent_channels, 8, 8)
    assert (padded.decode(latents) - reference.decode(latents)).abs().max().item() < 1e-5
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    assert padded.encode(images).shape == reference.encode(images).shape
