"""A frame's recipe: step angles, fixed noise, prompt embedding and guidance, built once per config.

A ``Plan`` is immutable and shared by every frame that entered under the same stream config, so a
reconfigure only changes which plan *new* frames get: frames already in flight finish with theirs.
``predict_x0`` is the one place a batched model call happens (sampler math around the backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ditstream.engine import sampler
from ditstream.engine.backends.base import Backend
from ditstream.engine.config import StreamConfig
from ditstream.engine.loader import ModelComponents
from ditstream.engine.prompt_cache import PromptCache


@dataclass(frozen=True)
class Plan:
    """Everything a frame needs besides its image. Tensors live on the engine's device.

    ``angles`` (n,); ``noise`` (n, C, h, w): index 0 enters, index k re-noises after step k;
    ``embeds`` (1, L, D); ``mask`` (1, L); ``guidance`` (1,) already scaled.
    """

    config: StreamConfig
    angles: torch.Tensor
    noise: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor
    guidance: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.angles.shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.noise.shape[1:])


def latent_shape(components: ModelComponents, width: int, height: int) -> tuple[int, int, int]:
    f = components.vae_scale_factor
    return (components.latent_channels, height // f, width // f)


def make_plan(cfg: StreamConfig, components: ModelComponents, prompts: PromptCache) -> Plan:
    """Build the plan of ``cfg`` (the prompt embedding comes from the cache)."""
    angles = sampler.step_angles(cfg.mode, cfg.steps, cfg.strength, cfg.timesteps,
                                 intermediate=components.intermediate_angle)
    shape = latent_shape(components, cfg.width, cfg.height)
    noise = sampler.draw_noise(cfg.seed, shape, angles.shape[0], device=components.device)
    embeds, mask = prompts.get(cfg.prompt)
    guidance = sampler.guidance_vector(
        torch.full((1,), cfg.guidance_scale, dtype=torch.float32).to(components.dtype),
        components.guidance_embeds_scale,
    ).to(components.device)
    return Plan(config=cfg, angles=angles.to(components.device), noise=noise, embeds=embeds, mask=mask,
                guidance=guidance)


def predict_x0(backend: Backend, components: ModelComponents, x: torch.Tensor, t: torch.Tensor,
               embeds: torch.Tensor, mask: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """One batched model call: latents ``x`` (B, C, h, w) at angles ``t`` (B,) → clean latents x0."""
    sd = components.sigma_data
    x_in, s = sampler.model_input(x, t, sd)
    raw = backend.denoise(x_in, s, embeds, mask, guidance)
    return sampler.denoised(x, x_in, raw, t, s, sd)


def encode_clean(backend: Backend, components: ModelComponents, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] → clean latents in sampler units."""
    z = backend.encode(images.to(components.vae.dtype))
    return sampler.from_vae_latent(z.float(), components.sigma_data, components.scaling_factor)


def decode_clean(backend: Backend, components: ModelComponents, x0: torch.Tensor) -> torch.Tensor:
    """Clean latents in sampler units → images in [-1, 1]."""
    z = sampler.to_vae_latent(x0, components.sigma_data, components.scaling_factor)
    return backend.decode(z.to(components.vae.dtype))
