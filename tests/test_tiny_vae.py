"""TAESANA-format tiny encoder/decoder: architecture, loading user-given files, backend wrapper.

Random weights of the same architecture stand in for the published ones (no download): what is
tested is that files in that format load strictly, shapes are 32×, the conventions (images in
[-1, 1], unscaled latents) are converted correctly, and a wrong file fails with a clear error.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ditstream.engine.backends.base import Backend
from ditstream.engine.errors import ModelLoadError
from ditstream.engine.tiny_vae import (
    TINY_SCALE_FACTOR,
    TinyAutoencoder,
    TinyVaeBackend,
    tiny_decoder,
    tiny_encoder,
)

#: Parameter names as in the published taesana_*.pth (nn.Sequential indices).
ENCODER_KEYS = {"0.weight", "0.bias", "2.weight", "4.conv.0.weight", "5.weight", "17.weight", "17.bias"}
DECODER_KEYS = {"1.weight", "1.bias", "3.conv.4.weight", "7.weight", "8.conv.0.weight", "28.conv.4.bias",
                "29.weight", "29.bias"}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesana")
    torch.manual_seed(0)
    enc, dec = tiny_encoder(32), tiny_decoder(32)
    torch.save(enc.state_dict(), root / "taesana_encoder.pth")
    from safetensors.torch import save_file

    save_file(dec.state_dict(), str(root / "taesana_decoder.safetensors"))
    return root / "taesana_encoder.pth", root / "taesana_decoder.safetensors", enc, dec


def test_state_dict_layout_matches_the_published_format():
    enc_keys, dec_keys = set(tiny_encoder().state_dict()), set(tiny_decoder().state_dict())
    assert ENCODER_KEYS <= enc_keys
    assert DECODER_KEYS <= dec_keys
    assert not any(".skip" in k for k in enc_keys | dec_keys)  # equal widths: identity skips, no weights
    assert "5.bias" not in enc_keys and "7.bias" not in dec_keys  # stride/upsample convs have no bias
    assert max(int(k.split(".")[0]) for k in enc_keys) == 17 and max(int(k.split(".")[0]) for k in dec_keys) == 29
    # the decoder is the ~8 M-parameter conv-only net, the encoder about 1.2 M
    n_dec = sum(p.numel() for p in tiny_decoder().parameters())
    assert 7e6 < n_dec < 10e6


def test_shapes_are_32x(weight_files):
    _, _, enc, dec = weight_files
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        lat = enc(x)
        assert lat.shape == (2, 32, 64 // TINY_SCALE_FACTOR, 96 // TINY_SCALE_FACTOR)
        assert dec(lat).shape == (2, 3, 64, 96)


def test_loads_user_files_and_converts_conventions(weight_files):
    enc_path, dec_path, enc, dec = weight_files
    tiny = TinyAutoencoder.from_files(enc_path, dec_path, scaling_factor=0.41407)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        # encode: [-1, 1] -> [0, 1] for the net, and its scaled latents -> unscaled
        assert torch.allclose(tiny.encode(images), enc((images + 1) / 2) / 0.41407, atol=1e-6)
        latents = torch.randn(1, 32, 2, 2)
        assert torch.allclose(tiny.decode(latents), dec(latents * 0.41407) * 2 - 1, atol=1e-6)


def test_decoder_only(weight_files):
    _, dec_path, _, _ = weight_files
    tiny = TinyAutoencoder.from_files(decoder_path=dec_path)
    assert tiny.encoder is None and tiny.decoder is not None


def test_wrong_or_missing_files_fail_clearly(weight_files, tmp_path):
    enc_path = weight_files[0]
    with pytest.raises(ModelLoadError, match="not a TAESANA decoder"):
        TinyAutoencoder.from_files(decoder_path=enc_path)  # an encoder file given as the decoder
    with pytest.raises(ModelLoadError, match="do not exist"):
        TinyAutoencoder.from_files(encoder_path=tmp_path / "nope.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not read"):
        TinyAutoencoder.from_files(encoder_path=bad)
    with pytest.raises(ModelLoadError, match="needs an encoder"):
        TinyAutoencoder.from_files()


class _FakeBackend(Backend):
    """A 32×, 32-channel model stand-in: records which calls reached it."""

    name = "fake"

    def __init__(self) -> None:
        comps = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, vae_scale_factor=32,
                                latent_channels=32, vae=SimpleNamespace(dtype=torch.float32))
        super().__init__(comps)
        self.calls: list[str] = []

    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        self.calls.append("denoise")
        return x

    def encode(self, images):
        self.calls.append("encode")
        return torch.zeros(images.shape[0], 32, images.shape[2] // 32, images.shape[3] // 32)

    def decode(self, latents):
        self.calls.append("decode")
        return torch.zeros(latents.shape[0], 3, latents.shape[2] * 32, latents.shape[3] * 32)


def test_backend_wrapper_replaces_only_the_sides_it_has(weight_files):
    _, dec_path, _, _ = weight_files
    inner = _FakeBackend()
    backend = TinyVaeBackend(inner, TinyAutoencoder.from_files(decoder_path=dec_path))
    assert backend.name == "fake+tiny-vae"
    out = backend.decode(torch.randn(2, 32, 2, 3))
    assert out.shape == (2, 3, 64, 96) and torch.isfinite(out).all()
    backend.encode(torch.zeros(1, 3, 64, 64))
    backend.denoise(torch.zeros(1, 32, 2, 2), torch.zeros(1), torch.zeros(1, 4, 8), torch.ones(1, 4), None)
    assert inner.calls == ["encode", "denoise"]  # decode went to the tiny decoder


def test_backend_wrapper_refuses_a_model_of_another_scale(weight_files, tiny_components):
    from ditstream.engine.backends import create_backend

    _, dec_path, _, _ = weight_files
    with pytest.raises(ModelLoadError, match="32"):
        TinyVaeBackend(create_backend("torch", tiny_components), TinyAutoencoder.from_files(decoder_path=dec_path))
