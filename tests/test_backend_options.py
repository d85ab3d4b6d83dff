"""Backend options (profile, engine cache, tiny VAE) reach every backend, from every command, and the
cache key they give is the one ``build-engine`` used: what it built is what ``serve`` loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from ditstream.engine.config import BackendOptions
from ditstream.engine.errors import ValidationError
from testkit import free_port, run_cli, wait_ready

EXIT_USAGE = 2




def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# -- one options object, one key ---------------------------------------------------------------------
def test_cli_and_env_options_are_the_same_object_and_the_same_key(tiny_components, tmp_path):
    from ditstream.server.settings import Settings
    from ditstream.trt_build.specs import artifact_spec, build_profile

    from ditstream.commands._args import backend_options

    cli = backend_options(["256", "512x256"], [1, 4], str(tmp_path), None, 2)
    env = Settings(resolutions="256,512x256", batches="1,4", cache_dir=str(tmp_path), opt_level="2").backend_options()
    assert cli == env == BackendOptions(resolutions=((256, 256), (512, 256)), batches=(1, 4),
                                        cache_dir=str(tmp_path), opt_level=2)
    profile = build_profile(tiny_components, cli.resolutions, cli.batches)
    assert profile.batch == (1, 1, 4) and profile.width == (256, 256, 512) and profile.height == (256, 256, 256)
    assert profile.seq_len[0] == tiny_components.max_sequence_length
    spec = artifact_spec(tiny_components, "transformer", "tensorrt", profile, opt_level=cli.opt_level)
    again = artifact_spec(tiny_components, "transformer", "tensorrt",
                          build_profile(tiny_components, env.resolutions, env.batches), opt_level=env.opt_level)
    assert spec.key() == again.key()
    other = build_profile(tiny_components, cli.resolutions, (1, 8))
    assert artifact_spec(tiny_components, "transformer", "tensorrt", other, opt_level=2).key() != spec.key()


def test_build_engine_and_the_tensorrt_backend_share_the_default_profile(tiny_components):
    from ditstream.engine.backends import tensorrt_backend
    from ditstream.trt_build.cache import DEFAULT_BATCHES, DEFAULT_RESOLUTIONS, BuildProfile
    from ditstream.trt_build.specs import build_profile

    # build-engine with no -r/-b and a backend with no options both call build_profile(components, (), ())
    assert build_profile(tiny_components) == BuildProfile.from_request(
        DEFAULT_RESOLUTIONS, DEFAULT_BATCHES, seq_len=tiny_components.max_sequence_length)
    assert tensorrt_backend.DEFAULT_RESOLUTIONS == DEFAULT_RESOLUTIONS
    assert tensorrt_backend.DEFAULT_BATCH_SIZES == DEFAULT_BATCHES


@pytest.mark.parametrize("options, field", [
    (BackendOptions(batches=(0,)), "batch"),
    (BackendOptions(resolutions=((0, 64),)), "resolution"),
    (BackendOptions(opt_level=7), "opt_level"),
    (BackendOptions(tiny_vae="/no/such/taesana"), "tiny_vae"),
])
def test_options_validate_without_loading_anything(options, field):
    with pytest.raises(ValidationError) as info:
        options.validate()
    assert info.value.field == field


def test_every_backend_receives_the_options(tiny_components, tmp_path):
    pytest.importorskip("onnxruntime")
    from ditstream.engine.backends import create_backend

    options = BackendOptions(resolutions=((64, 64), (128, 64)), batches=(1, 4), cache_dir=str(tmp_path))
    torch_backend = create_backend("torch", tiny_components, options)
    assert torch_backend.options is options
    onnx = create_backend("onnx", tiny_components, options)
    assert onnx.options is options and onnx.cache.root == tmp_path
    assert len(list(tmp_path.glob("*.onnx.json"))) == 3  # exported into --cache-dir
    limits = onnx.limits  # a profile asked for bounds what is admitted, and names the sizes to warm
    assert limits.max_batch == 4 and limits.width == (64, 128) and limits.sizes == ((64, 64), (128, 64))
    assert create_backend("onnx", tiny_components).limits.max_batch is None  # no profile: unbounded


# -- build-engine, then serve: the same cache entries, nothing new ---------------------------------
def test_serve_reuses_the_export_build_engine_made(tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    cache = tmp_path / "engines"
    profile = ["-r", "256", "-b", "1", "-b", "4"]
    built = run_cli("build-engine", "--model", str(tiny_model_dir), "--onnx-only", *profile, "--cache-dir", str(cache))
    assert built.returncode == 0, built.stderr
    listing = run_cli("build-engine", "--list", "--cache-dir", str(cache))
    assert listing.returncode == 0 and listing.stdout.count(" onnx ") == 3, listing.stdout
    files = _files(cache)

    port = free_port()
    default_cache = tmp_path / "xdg"  # where serve would export if it ignored --cache-dir
    proc = subprocess.Popen([sys.executable, "-m", "ditstream", "serve", "--model", str(tiny_model_dir),
                             "--backend", "onnx", *profile, "--cache-dir", str(cache), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "XDG_CACHE_HOME": str(default_cache)})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        card = httpx.get(base + "/v1/models", timeout=5).json()["data"][0]
        assert "onnx" in str(card), card
        # the profile reached the backend: new streams start at its size
        assert (card["defaults"]["width"], card["defaults"]["height"]) == (256, 256), card
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    after = run_cli("build-engine", "--list", "--cache-dir", str(cache))
    assert after.stdout == listing.stdout  # the same entries...
    assert _files(cache) == files  # ...and not one file new or rewritten: no second export
    # nor one in the default cache ($XDG_CACHE_HOME/ditstream): the backend looked in --cache-dir (other
    # libraries may make $XDG_CACHE_HOME itself)
    assert not (default_cache / "ditstream").exists(), sorted(p.relative_to(default_cache) for p in default_cache.rglob("*"))


# -- --tiny-vae ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def f32_model_dir(tmp_path_factory) -> Path:
    from ditstream.engine.synthetic import make_pipeline_folder

    return make_pipeline_folder(tmp_path_factory.mktemp("f32") / "pipe", "tiny-f32", seed=0,
                                complex_human_instruction=False,
                                defaults={"width": 64, "height": 64, "steps": 1, "strength": 0.6,
                                          "guidance_scale": 4.5})


@pytest.fixture(scope="module")
def taesana_dir(tmp_path_factory) -> Path:
    """TAESANA-format files for a 4-channel latent (random weights: the format, not the quality)."""
    from ditstream.engine.tiny_vae import tiny_decoder, tiny_encoder
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("taesana")
    torch.manual_seed(0)
    torch.save(tiny_encoder(4).state_dict(), root / "taesana_encoder.pth")
    save_file(tiny_decoder(4).state_dict(), str(root / "taesana_decoder.safetensors"))
    return root


def test_tiny_vae_files_from_a_folder_or_a_file(taesana_dir, tmp_path):
    enc, dec = BackendOptions(tiny_vae=str(taesana_dir)).tiny_vae_files()
    assert enc.name == "taesana_encoder.pth" and dec.name == "taesana_decoder.safetensors"
    assert BackendOptions(tiny_vae=str(dec)).tiny_vae_files() == (None, dec)
    with pytest.raises(ValidationError, match="holds neither"):
        BackendOptions(tiny_vae=str(tmp_path)).tiny_vae_files()


def test_create_backend_wraps_with_the_tiny_vae(f32_model_dir, taesana_dir):
    from ditstream.engine.backends import create_backend
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components

    components = load_components(ModelConfig(model=str(f32_model_dir)))
    backend = create_backend("torch", components, BackendOptions(tiny_vae=str(taesana_dir)))
    assert backend.name == "torch+tiny-vae"
    assert backend.decode(torch.zeros(1, 4, 2, 2)).shape == (1, 3, 64, 64)


def test_tiny_vae_on_a_model_of_another_scale_fails_before_the_backend_is_built(tiny_components, taesana_dir,
                                                                              tmp_path):
    from ditstream.engine.backends import create_backend
    from ditstream.engine.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="32"):
        create_backend("onnx", tiny_components, BackendOptions(tiny_vae=str(taesana_dir), cache_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir())  # refused before any export


def test_generate_with_tiny_vae(f32_model_dir, taesana_dir, tmp_path):
    common = ["generate", "--model", str(f32_model_dir), "--prompt", "a red circle", "--size", "64x64"]
    plain = run_cli(*common, "--out", str(tmp_path / "plain.npy"))
    assert plain.returncode == 0, plain.stderr
    tiny = run_cli(*common, "--tiny-vae", str(taesana_dir), "--out", str(tmp_path / "tiny.npy"))
    assert tiny.returncode == 0, tiny.stderr
    a, b = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "tiny.npy")
    assert a.shape == b.shape == (64, 64, 3) and np.isfinite(b).all()
    assert not np.allclose(a, b)  # the tiny decoder made this one, not DC-AE


# -- malformed options: exit 2, before the model loads --------------------------------------------------
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"], ["worker", "--redis", "redis://x"],
                                     ["build-engine", "--onnx-only"], ["bench", "engine"]])
@pytest.mark.parametrize("args, complaint", [
    (["-r", "12x"], "--resolution"),
    (["-r", "0"], "positive"),
    (["-b", "0"], "batch size"),
    (["--tiny-vae", "/no/such/taesana"], "does not exist"),
])
def test_malformed_options_are_refused_before_the_model_loads(tmp_path, command, args, complaint):
    r = run_cli(*command, "--model", str(tmp_path / "no-such-model"), *args, timeout=120)
    if command[0] == "build-engine" and args[0] == "--tiny-vae":
        assert r.returncode == EXIT_USAGE and "No such option" in r.stderr  # build-engine builds no tiny VAE
        return
    assert r.returncode == EXIT_USAGE, r.stderr
    assert complaint in r.stderr and "no-such-model" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("env, complaint", [
    ({"DITSTREAM_RESOLUTIONS": "512,big"}, "DITSTREAM_RESOLUTIONS"),
    ({"DITSTREAM_BATCHES": "1,x"}, "DITSTREAM_BATCHES"),
    ({"DITSTREAM_TINY_VAE": "/no/such/taesana"}, "DITSTREAM_TINY_VAE"),
])
def test_malformed_env_options_are_refused_before_the_model_loads(tmp_path, env, complaint):
    r = run_cli("serve", "--model", str(tmp_path / "no-such-model"), env=env, timeout=120)
    assert r.returncode == EXIT_USAGE and complaint in r.stderr and "no-such-model" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
