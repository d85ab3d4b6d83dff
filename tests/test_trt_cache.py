"""Engine cache keys, sidecars and atomic writes — all without TensorRT.

The failure these guard against is StreamDiffusion's: an engine reused for another resolution or
TensorRT version, or a half-written file that looks valid after a crash.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from ditstream.trt_build.build import engine_spec, input_profiles, trt_version
from ditstream.trt_build.cache import BuildProfile, BuildSpec, EngineCache, weights_hash

BASE = BuildSpec(weights_hash="abc", component="transformer", dtype="fp16",
                 profile=BuildProfile(batch=(1, 1, 4), height=(256, 512, 1024), width=(256, 512, 1024)),
                 flags=(("strongly_typed", True), ("opt_level", 3)), trt_version="10.9.0",
                 compute_capability="8.9")


@pytest.mark.parametrize("change", [
    {"weights_hash": "abd"},
    {"component": "vae_decoder"},
    {"dtype": "bf16"},
    {"profile": BuildProfile(batch=(1, 1, 8), height=(256, 512, 1024), width=(256, 512, 1024))},
    {"profile": BuildProfile(batch=(1, 1, 4), height=(256, 768, 1024), width=(256, 512, 1024))},
    {"flags": (("strongly_typed", True), ("opt_level", 5))},
    {"trt_version": "10.10.0"},
    {"compute_capability": "9.0"},
    {"gpu": "NVIDIA H200"},
    {"trt_flavour": "cu13"},
    {"extra": (("diffusers", "0.43.0"),)},
    {"kind": "onnx"},
], ids=lambda c: next(iter(c)))
def test_every_field_changes_the_key(change):
    assert dataclasses.replace(BASE, **change).key() != BASE.key()


def test_key_is_stable_and_filename_is_readable():
    same = BuildSpec(**{f.name: getattr(BASE, f.name) for f in dataclasses.fields(BuildSpec)})
    assert same.key() == BASE.key()
    assert len(BASE.key()) == 24
    assert BASE.filename(".plan") == f"transformer-fp16-{BASE.key()}.plan"


def test_profile_from_request_covers_everything_asked_for():
    p = BuildProfile.from_request([(768, 512), (512, 512), (1024, 1024)], [4, 1, 8], seq_len=300)
    assert p.batch == (1, 4, 8)
    assert p.width == (512, 768, 1024) and p.height == (512, 512, 1024)
    assert p.covers(8, 1024, 1024) and p.covers(1, 512, 768)
    assert not p.covers(9, 512, 512) and not p.covers(1, 256, 512)
    with pytest.raises(ValueError):
        BuildProfile(batch=(4, 1, 8))
    with pytest.raises(ValueError):
        BuildProfile.from_request([], [1])


def test_weights_hash_follows_content_not_identity():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 4)
    b = torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-3
    assert weights_hash(a) != weights_hash(b)
    assert weights_hash(a.to(torch.bfloat16)) != weights_hash(b)  # bf16 hashes by its bytes


def test_store_then_lookup_hits(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(BASE) is None
    path = cache.store_bytes(BASE, b"engine bytes", info={"note": "x"})
    assert path.name == BASE.filename(".plan")
    assert cache.lookup(BASE) == path
    meta = json.loads(cache.sidecar(path).read_text())
    assert meta["spec"] == BASE.to_dict() and meta["size"] == len(b"engine bytes") and meta["note"] == "x"
    assert [e["key"] for e in cache.entries()] == [BASE.key()]


def test_other_spec_misses(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store_bytes(BASE, b"engine")
    assert cache.lookup(dataclasses.replace(BASE, trt_version="10.10.0")) is None


def test_sidecar_of_another_spec_is_not_trusted(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store_bytes(BASE, b"engine")
    side = cache.sidecar(path)
    meta = json.loads(side.read_text())
    meta["spec"]["profile"]["batch"] = [1, 1, 8]
    side.write_text(json.dumps(meta))
    assert cache.lookup(BASE) is None


def test_truncated_or_altered_artifact_misses(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store_bytes(BASE, b"0123456789")
    path.write_bytes(b"01234")
    assert cache.lookup(BASE) is None
    path.write_bytes(b"0123456788")  # same size, different bytes
    assert cache.lookup(BASE) is None
    assert cache.lookup(BASE, verify_digest=False) == path


def test_artifact_without_sidecar_misses(tmp_path):
    """A crash after the artifact landed but before its sidecar leaves an entry that does not count."""
    cache = EngineCache(tmp_path)
    path = cache.store_bytes(BASE, b"engine")
    cache.sidecar(path).unlink()
    assert cache.lookup(BASE) is None


def test_failed_build_leaves_nothing(tmp_path):
    cache = EngineCache(tmp_path)

    def writer(tmp):
        tmp.write_bytes(b"half an engine")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        cache.store_with(BASE, writer)
    assert list(tmp_path.iterdir()) == []
    assert cache.lookup(BASE) is None


def test_failed_rebuild_keeps_no_valid_looking_old_entry_half_replaced(tmp_path):
    cache = EngineCache(tmp_path)
    old = cache.store_bytes(BASE, b"old engine")

    def writer(tmp):
        raise KeyboardInterrupt  # even an interrupt cleans up

    with pytest.raises(KeyboardInterrupt):
        cache.store_with(BASE, writer)
    # The old complete entry is untouched, and no temporary is left behind.
    assert cache.lookup(BASE) == old and old.read_bytes() == b"old engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old.name, cache.sidecar(old).name])


def test_folder_artifacts_are_published_whole(tmp_path):
    cache = EngineCache(tmp_path)

    def writer(tmp):
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(b"graph")

    path = cache.store_with(BASE, writer, suffix=".onnx")
    assert (path / "model.onnx").read_bytes() == b"graph"
    assert cache.lookup(BASE, suffix=".onnx") == path
    # rebuilding replaces the folder
    cache.store_with(BASE, lambda tmp: (tmp.mkdir(), (tmp / "model.onnx").write_bytes(b"new")), suffix=".onnx")
    assert (path / "model.onnx").read_bytes() == b"new"
    assert len(list(tmp_path.iterdir())) == 2


def test_engine_spec_and_input_profiles_from_tiny_components(tiny_components):
    profile = BuildProfile.from_request([(32, 32), (64, 48)], [1, 4], seq_len=8)
    spec = engine_spec(tiny_components, "transformer", profile)
    assert spec.dtype == "fp32" and spec.trt_version == trt_version()
    assert spec.key() == engine_spec(tiny_components, "transformer", profile).key()
    assert spec.key() != engine_spec(tiny_components, "vae_decoder", profile).key()

    shapes = input_profiles(tiny_components, "transformer", profile)
    assert shapes["sample"] == ((1, 4, 16, 16), (1, 4, 16, 16), (4, 4, 24, 32))
    assert shapes["encoder_hidden_states"][2] == (4, 8, 8)
    assert set(shapes) == {"sample", "timestep", "encoder_hidden_states", "encoder_attention_mask", "guidance"}
    assert input_profiles(tiny_components, "vae_encoder", profile)["images"][2] == (4, 3, 48, 64)
    assert input_profiles(tiny_components, "vae_decoder", profile)["latents"][0] == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="multiples"):
        input_profiles(tiny_components, "vae_encoder", BuildProfile(height=(31, 32, 32)))


def test_build_engine_cli_onnx_only_then_list(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from ditstream.cli import app

    runner = CliRunner()
    args = ["build-engine", "--model", str(tiny_model_dir), "--onnx-only", "--cache-dir", str(tmp_path),
            "-r", "64x32", "-r", "32", "-b", "1", "-b", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "batch 1/1/4, height 32/32/32, width 32/64/64" in result.output
    assert len(list(tmp_path.glob("*.onnx.json"))) == 3
    listed = runner.invoke(app, ["build-engine", "--list", "--cache-dir", str(tmp_path)])
    assert listed.exit_code == 0 and listed.output.count("onnx ") == 3


@pytest.mark.skipif(torch.cuda.is_available() and bool(trt_version()), reason="checks the refusal without TensorRT/CUDA")
def test_build_engine_cli_refuses_without_tensorrt_or_cuda(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from ditstream.cli import app

    result = CliRunner().invoke(app, ["build-engine", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.output or "needs a CUDA GPU" in result.output
    assert list(tmp_path.iterdir()) == []


def test_get_or_build_engine_flow_without_tensorrt(tiny_components, tmp_path, monkeypatch):
    """Export → checks → build → cache, with the TensorRT build itself replaced by a recorder."""
    import copy

    import ditstream.trt_build.build as build
    import ditstream.trt_build.specs as specs

    calls: list[tuple[str, dict]] = []

    def fake_build(onnx_path, shapes, **kwargs):
        calls.append((str(onnx_path), shapes))
        return b"engine for " + str(sorted(shapes)).encode()

    monkeypatch.setattr(specs, "trt_version", lambda: "10.0.test")  # the key is computed in specs
    monkeypatch.setattr(specs, "compute_capability", lambda device=0: "8.9")
    monkeypatch.setattr(build, "build_engine_bytes", fake_build)
    cache = EngineCache(tmp_path)
    profile = BuildProfile.from_request([(32, 32), (64, 64)], [1, 2], seq_len=8)

    path = build.get_or_build_engine(tiny_components, "vae_decoder", profile, cache=cache)
    assert path.read_bytes().startswith(b"engine for") and len(calls) == 1
    assert calls[0][1]["latents"] == ((1, 4, 16, 16), (1, 4, 16, 16), (2, 4, 32, 32))
    assert build.get_or_build_engine(tiny_components, "vae_decoder", profile, cache=cache) == path
    assert len(calls) == 1  # cache hit: no second build
    wider = BuildProfile.from_request([(32, 32), (64, 64)], [1, 4], seq_len=8)
    assert build.get_or_build_engine(tiny_components, "vae_decoder", wider, cache=cache) != path
    assert len(calls) == 2  # another profile is another engine
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # ...from the same cached export

    class Bf16:  # bf16 decoder: the graph handed to TensorRT has its Resizes wrapped in fp32 casts
        transformer = tiny_components.transformer
        vae = copy.deepcopy(tiny_components.vae).to(torch.bfloat16)
        vae_scale_factor = tiny_components.vae_scale_factor

    build.get_or_build_engine(Bf16, "vae_decoder", profile, cache=cache)
    assert calls[-1][0].endswith("model.trt.onnx")


def test_keys_carry_exporter_versions_gpu_and_flavour(tiny_components, monkeypatch):
    import ditstream.trt_build.specs as specs

    profile = BuildProfile.from_request([(32, 32)], [1], seq_len=8)
    onnx_spec = specs.artifact_spec(tiny_components, "vae_decoder", "onnx")
    engine = specs.artifact_spec(tiny_components, "vae_decoder", "tensorrt", profile)
    for spec in (onnx_spec, engine):
        assert {k for k, _ in spec.extra} == {"torch", "onnx", "diffusers", "export_revision"}
    monkeypatch.setattr(specs, "EXPORT_REVISION", specs.EXPORT_REVISION + 1)
    assert specs.artifact_spec(tiny_components, "vae_decoder", "onnx").key() != onnx_spec.key()
    monkeypatch.setattr(specs, "gpu_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(specs, "trt_flavour", lambda: "cu12")
    other = specs.artifact_spec(tiny_components, "vae_decoder", "tensorrt", profile)
    assert (other.gpu, other.trt_flavour) == ("NVIDIA H200", "cu12") and other.key() != engine.key()
    assert "tensorrt-cu" in specs.trt_install_hint()


def test_lock_excludes_threads_and_get_or_create_builds_once(tmp_path):
    import threading
    import time

    cache = EngineCache(tmp_path)
    calls: list[int] = []

    def writer(tmp):
        calls.append(1)
        time.sleep(0.2)  # long enough that the other thread asks while this one builds
        tmp.write_bytes(b"engine")

    results: list = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_create(BASE, writer)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(created for _, created in results) == [False, False, True]
    assert len({path for path, _ in results}) == 1 and cache.lookup(BASE) is not None


_WORKER = r"""
import json, sys, time
from pathlib import Path
import ditstream.trt_build.export as export
from ditstream.engine.config import ModelConfig
from ditstream.engine.loader import load_components
from ditstream.trt_build.cache import EngineCache

model, cache_dir, go, log = sys.argv[1:5]
components = load_components(ModelConfig(model=model, device="cpu", dtype="fp32"))
real = export.export_component

def counted(*args, **kwargs):
    with open(log, "a") as fh:
        fh.write("export\n")
    time.sleep(1.0)  # widen the race window
    return real(*args, **kwargs)

export.export_component = counted
while not Path(go).exists():  # start both exports at the same moment
    time.sleep(0.01)
print(json.dumps(str(export.get_or_export(components, "vae_decoder", cache=EngineCache(cache_dir)))))
"""


def test_two_processes_exporting_into_one_cache_leave_one_valid_entry(tiny_model_dir, tmp_path):
    """Two workers on one cache volume: one exports (under the lock), the other waits and hits."""
    import subprocess
    import sys
    import time

    pytest.importorskip("onnx", reason="the ONNX export needs onnx (the 'onnx' extra)")
    cache_dir, go, log = tmp_path / "cache", tmp_path / "go", tmp_path / "exports.log"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tiny_model_dir), str(cache_dir), str(go), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    paths = {json.loads(out.strip().splitlines()[-1]) for out, _ in outs}
    assert len(paths) == 1
    assert log.read_text().count("export") == 1
    entries = EngineCache(cache_dir).entries()
    assert len(entries) == 1 and entries[0]["spec"]["kind"] == "onnx"
    visible = sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))
    assert len(visible) == 2  # the export folder and its sidecar
    assert sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(".")) == [".locks"]  # no temporaries
    import onnx

    onnx.checker.check_model(str(next(iter(paths))))


class _FakeTimingCache:
    def __init__(self, tactics, tag="trt10-h200"):
        self.tactics, self.tag = set(tactics), tag

    def combine(self, other, ignore_mismatch):
        if other.tag != self.tag:
            return False
        self.tactics |= other.tactics
        return True

    def serialize(self):
        return json.dumps([self.tag, sorted(self.tactics)]).encode()


class _FakeConfig:
    """The two calls of TensorRT's IBuilderConfig the timing-cache code makes."""

    def __init__(self, tag="trt10-h200"):
        self.tag, self.set_with = tag, None

    def create_timing_cache(self, blob):
        if not blob:
            return _FakeTimingCache((), self.tag)
        tag, tactics = json.loads(blob)
        return _FakeTimingCache(tactics, tag)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.tag != self.tag:
            return False
        self.set_with = cache
        return True


def test_timing_cache_is_merged_never_clobbered(tmp_path):
    from contextlib import nullcontext

    from ditstream.trt_build.build import load_timing_cache, save_timing_cache

    path = tmp_path / "timing.cache"
    path.write_bytes(_FakeTimingCache({"a"}).serialize())
    config = _FakeConfig()
    ours = load_timing_cache(None, config, path)
    assert config.set_with is ours and ours.tactics == {"a"}
    ours.tactics.add("b")
    path.write_bytes(_FakeTimingCache({"a", "c"}).serialize())  # another worker saved meanwhile
    assert save_timing_cache(None, config, ours, path, nullcontext())
    assert set(json.loads(path.read_bytes())[1]) == {"a", "b", "c"}

    # A cache from another TensorRT/GPU: the build starts empty, and the file is left alone.
    other = _FakeConfig(tag="trt10-h100")
    fresh = load_timing_cache(None, other, path)
    assert fresh.tactics == set() and other.set_with is fresh
    fresh.tactics.add("z")
    before = path.read_bytes()
    assert not save_timing_cache(None, other, fresh, path, nullcontext())
    assert path.read_bytes() == before
