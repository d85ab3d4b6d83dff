"""Optional tiny encoder/decoder in the TAESANA format (TAESD's 32×-downscaling ``f32`` variant).

Why: per 512² img2img frame DC-AE costs 1.30 + 2.09 TFLOP against the transformer's 0.32
(ANCHORS.md) — the autoencoder, not the DiT, is the wall. A conv-only tiny autoencoder trades some
quality for most of that cost. diffusers' ``AutoencoderTiny`` cannot load TAESANA (its channel
layout differs), so the architecture is defined here with the same ``nn.Sequential`` indexing as
the published ``taesana_encoder.pth``/``taesana_decoder.pth`` state dicts, which load as is.
Weights are never downloaded: the user passes file paths (``.pth``/``.pt`` or ``.safetensors``).

Conventions (TAESD's): the tiny encoder takes images in [0, 1] and returns latents already in the
diffusion model's scaled space (``vae_latent · scaling_factor``); the tiny decoder is the inverse.
``TinyVaeBackend`` converts to and from the backend interface (images in [-1, 1], unscaled latents)
so the sampler never needs to know which autoencoder ran.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from ditstream.engine.backends.base import Backend, BackendLimits
from ditstream.engine.errors import ModelLoadError
from torch import nn

logger = logging.getLogger(__name__)


def _conv(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    """Soft clamp to (-3, 3): keeps out-of-range latents from exploding the decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """Three 3×3 convs with ReLU and a (1×1 when widths differ) skip, then ReLU."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(latent_channels: int = 32) -> nn.Sequential:
    """Images (B, 3, H, W) in [0, 1] → scaled latents (B, c, H/32, W/32)."""
    layers: list[nn.Module] = [_conv(3, 32, stride=2), nn.ReLU(), _conv(32, 64, stride=2), nn.ReLU(),
                               _Block(64, 64)]
    for _ in range(3):
        layers += [_conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64)]
    layers.append(_conv(64, latent_channels))
    return nn.Sequential(*layers)


def tiny_decoder(latent_channels: int = 32) -> nn.Sequential:
    """Scaled latents (B, c, h, w) → images (B, 3, 32h, 32w) in about [0, 1]."""
    layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, 256), nn.ReLU()]
    widths = ((256, 128), (128, 64), (64, 64), (64, 64), (64, 64))
    for n_in, n_out in widths:
        layers += [_Block(n_in, n_in), _Block(n_in, n_in), _Block(n_in, n_in), nn.Upsample(scale_factor=2),
                   _conv(n_in, n_out, bias=False)]
    layers += [_Block(64, 64), _conv(64, 3)]
    return nn.Sequential(*layers)


#: Spatial factor of the f32 variant (five stride-2 stages each way).
TINY_SCALE_FACTOR = 32


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch pickle (``weights_only``) state dict from a user-given file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"tiny autoencoder weights {str(path)!r} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read tiny autoencoder weights {str(path)!r}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{str(path)!r} does not hold a state dict")
    return state


def _load_into(module: nn.Module, path: str | Path, what: str) -> nn.Module:
    state = load_state_dict_file(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{str(path)!r} is not a TAESANA {what} state dict: {exc}") from exc
    return module


class TinyAutoencoder(nn.Module):
    """TAESANA encoder and/or decoder, with conversions to the backend interface's conventions."""

    def __init__(self, encoder: nn.Module | None, decoder: nn.Module | None, scaling_factor: float) -> None:
        super().__init__()
        if encoder is None and decoder is None:
            raise ModelLoadError("a tiny autoencoder needs an encoder, a decoder or both")
        self.encoder = encoder
        self.decoder = decoder
        self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_files(cls, encoder_path: str | Path | None = None, decoder_path: str | Path | None = None, *,
                   latent_channels: int = 32, scaling_factor: float = 0.41407) -> TinyAutoencoder:
        """Load TAESANA-format weight files (either may be omitted to keep DC-AE for that side)."""
        enc = _load_into(tiny_encoder(latent_channels), encoder_path, "encoder") if encoder_path else None
        dec = _load_into(tiny_decoder(latent_channels), decoder_path, "decoder") if decoder_path else None
        logger.info("loaded tiny autoencoder (encoder=%s, decoder=%s)", encoder_path, decoder_path)
        return cls(enc, dec, scaling_factor).eval().requires_grad_(False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → unscaled latents (what DC-AE's ``encode(x).latent`` returns)."""
        assert self.encoder is not None
        return self.encoder(images.add(1).mul(0.5)) / self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents → images in [-1, 1]."""
        assert self.decoder is not None
        return self.decoder(latents * self.scaling_factor).mul(2).sub(1)


def check_fits(tiny: TinyAutoencoder, components: Any) -> None:
    """Raise ``ModelLoadError`` unless ``tiny`` fits the model: a 32× VAE with the same latent channels."""
    f = components.vae_scale_factor
    if f != TINY_SCALE_FACTOR:
        raise ModelLoadError(f"TAESANA is a {TINY_SCALE_FACTOR}× autoencoder but this model's VAE is {f}×")
    channels = components.latent_channels
    for side in (tiny.encoder, tiny.decoder):
        if side is None:
            continue
        conv = side[-1] if side is tiny.encoder else side[1]
        got = conv.out_channels if side is tiny.encoder else conv.in_channels
        if got != channels:
            raise ModelLoadError(f"tiny {'encoder' if side is tiny.encoder else 'decoder'} has {got} latent "
                                 f"channels; the model has {channels}")


def load_for_model(options: Any, components: Any) -> TinyAutoencoder:
    """The tiny autoencoder named by ``options.tiny_vae`` (``BackendOptions``), checked against the model.

    Loaded before the backend is built, so a wrong file fails in seconds, not after an engine build.
    """
    encoder_path, decoder_path = options.tiny_vae_files()
    tiny = TinyAutoencoder.from_files(encoder_path, decoder_path, latent_channels=components.latent_channels,
                                      scaling_factor=components.scaling_factor)
    check_fits(tiny, components)
    return tiny


class TinyVaeBackend(Backend):
    """Any backend with its VAE encode/decode replaced by a tiny autoencoder.

    The transformer still runs on ``inner``; only the sides the tiny model has are replaced (e.g.
    a tiny decoder with DC-AE's encoder keeps img2img input fidelity and cuts the larger cost).
    """

    def __init__(self, inner: Backend, tiny: TinyAutoencoder) -> None:
        super().__init__(inner.components, getattr(inner, "options", None))
        check_fits(tiny, inner.components)
        self.inner = inner
        # Same dtype as the VAE it replaces (the loader never gives the VAE fp16).
        self.tiny = tiny.to(device=inner.device, dtype=inner.components.vae.dtype)
        self.name = f"{inner.name}+tiny-vae"
        self.needs_warmup = inner.needs_warmup
        self.supports_loras = inner.supports_loras
        self.warm = inner.warm

    @property
    def limits(self) -> BackendLimits:
        return self.inner.limits

    def warmup_batches(self, max_batch: int) -> list[int]:
        return self.inner.warmup_batches(max_batch)

    def warmup(self, shapes: list[tuple[int, int, int]]) -> None:
        self.inner.warmup(shapes)

    def temporal_attention(self):
        return self.inner.temporal_attention()

    def set_loras(self, loras) -> None:
        self.inner.set_loras(loras)

    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        return self.inner.denoise(x, timestep, encoder_hidden_states, encoder_attention_mask, guidance)

    @torch.inference_mode()
    def encode(self, images):
        if self.tiny.encoder is None:
            return self.inner.encode(images)
        dtype = next(self.tiny.encoder.parameters()).dtype
        return self.tiny.encode(images.to(self.device, dtype))

    @torch.inference_mode()
    def decode(self, latents):
        if self.tiny.decoder is None:
            return self.inner.decode(latents)
        dtype = next(self.tiny.decoder.parameters()).dtype
        return self.tiny.decode(latents.to(self.device, dtype))
