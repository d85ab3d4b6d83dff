"""A frame's recipe: step angles, fixed noise, prompt embedding and guidance, built once per config.

A ``Plan`` is immutable and shared by every frame that entered under the same stream config, so a
reconfigure only changes which plan *new* frames get: frames already in flight finish with theirs.
``predict_x0`` is the one place a batched model call happens (sampler math around the backend).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from ditstream.engine import sampler
from ditstream.engine.backends.base import Backend
from ditstream.engine.config import StreamConfig
from ditstream.engine.loader import ModelComponents
from ditstream.engine.lora import LoraSet, glide_sets, resolve_set
from ditstream.engine.prompt_cache import PromptSource


@dataclass(frozen=True)
class Plan:
    """Everything a frame needs besides its image. Tensors live on the engine's device.

    ``angles`` (n,); ``noise`` (n, C, h, w): index 0 enters, index k re-noises after step k;
    ``embeds`` (1, L, D); ``mask`` (1, L); ``guidance`` (1,) already scaled; ``loras`` the adapter
    set its model calls run (``engine.lora``; empty: the base model).
    """

    config: StreamConfig
    angles: torch.Tensor
    noise: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor
    guidance: torch.Tensor
    loras: LoraSet = ()

    @property
    def steps(self) -> int:
        return int(self.angles.shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.noise.shape[1:])


def latent_shape(components: ModelComponents, width: int, height: int) -> tuple[int, int, int]:
    f = components.vae_scale_factor
    return (components.latent_channels, height // f, width // f)


def make_plan(cfg: StreamConfig, components: ModelComponents, prompts: PromptSource) -> Plan:
    """Build the plan of ``cfg`` (the prompt embedding comes from the cache)."""
    angles = sampler.step_angles(cfg.mode, cfg.steps, cfg.strength, cfg.timesteps,
                                 intermediate=components.intermediate_angle)
    shape = latent_shape(components, cfg.width, cfg.height)
    seeds = [s for s in cfg.seeds if s.weight > 0]
    if components.draws_noise:
        noise = sampler.blend_noise(
            [sampler.draw_noise(s.seed, shape, angles.shape[0], device=components.device) for s in seeds],
            [s.weight for s in seeds])
    else:
        noise = _zeros(int(angles.shape[0]), shape, components.device)
    entries = [p for p in cfg.prompts if p.weight > 0]  # each from the cache: encoded once per text
    encoded = [prompts.get(p.text) for p in entries]
    embeds, mask = sampler.blend_embeddings([e for e, _ in encoded], [m for _, m in encoded],
                                            sampler.normalise_weights([p.weight for p in entries]),
                                            cfg.prompt_interpolation)
    guidance = sampler.guidance_vector(
        torch.full((1,), cfg.guidance_scale, dtype=torch.float32).to(components.dtype),
        components.guidance_embeds_scale,
    ).to(components.device)
    loras = resolve_set(cfg.lora_scales, components.loras)
    return Plan(config=cfg, angles=angles.to(components.device), noise=noise, embeds=embeds, mask=mask,
                guidance=guidance, loras=loras)


@functools.lru_cache(maxsize=8)
def _zeros(count: int, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """The noise of a model that draws none: one shared tensor per shape, so glides between plans
    of that shape keep it as it is (``glide``: the same noise object is not blended)."""
    return torch.zeros((count, *shape), device=device)


def can_glide(a: Plan | None, b: Plan | None) -> bool:
    """Whether a transition from ``a`` to ``b`` is defined: same mode, step count and latent shape
    (a change of size, mode or steps has no in-between and jumps)."""
    return (a is not None and b is not None and a.config.mode == b.config.mode and a.steps == b.steps
            and a.latent_shape == b.latent_shape)


def glide(a: Plan, b: Plan, alpha: float) -> Plan:
    """The plan ``alpha`` ∈ [0, 1] of the way from ``a`` to ``b`` (``can_glide(a, b)``); 1 is ``b`` itself.

    Embedding by ``b``'s ``prompt_interpolation`` (masks united), noise by slerp at unit variance,
    angles, guidance and LoRA scales linearly — img2img angles are linear in strength, so this glides strength.
    """
    if alpha >= 1.0:
        return b
    embeds, mask = sampler.blend_embeddings([a.embeds, b.embeds], [a.mask, b.mask], [1.0 - alpha, alpha],
                                            b.config.prompt_interpolation)
    noise = a.noise if a.noise is b.noise else sampler.blend_noise([a.noise, b.noise], [1.0 - alpha, alpha])
    return replace(b, angles=sampler.lerp(a.angles, b.angles, alpha), noise=noise, embeds=embeds, mask=mask,
                   guidance=sampler.lerp(a.guidance, b.guidance, alpha), loras=glide_sets(a.loras, b.loras, alpha))


@dataclass
class Transition:
    """A stream gliding from ``start`` to ``target`` over ``frames`` new frames (mutable, one per stream).

    Frame k = 1 … ``frames`` after the reconfigure enters with ``glide(start, target, k / frames)``, so
    the last one is exactly ``target``. A reconfigure mid-way starts a new transition from the plan
    the stream's latest frame entered with.
    """

    start: Plan
    target: Plan
    frames: int
    taken: int = 0

    @classmethod
    def between(cls, start: Plan | None, target: Plan, frames: int) -> Transition | None:
        """A transition, or ``None`` when the change should jump (0 frames, or no in-between)."""
        if frames <= 0 or not can_glide(start, target):
            return None
        return cls(start, target, frames)

    def next_plan(self) -> Plan:
        """The plan of the next frame (advances the transition)."""
        self.taken = min(self.taken + 1, self.frames)
        return glide(self.start, self.target, self.taken / self.frames)

    @property
    def finished(self) -> bool:
        return self.taken >= self.frames


def predict_x0(backend: Backend, components: ModelComponents, x: torch.Tensor, t: torch.Tensor,
               embeds: torch.Tensor, mask: torch.Tensor, guidance: torch.Tensor, loras: LoraSet = ()) -> torch.Tensor:
    """One batched model call: latents ``x`` (B, C, h, w) at angles ``t`` (B,) → clean latents x0, with the
    adapter set ``loras`` (one per call: the core groups calls by it)."""
    sd = components.sigma_data
    x_in, s = sampler.model_input(x, t, sd)
    backend.set_loras(loras)
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
