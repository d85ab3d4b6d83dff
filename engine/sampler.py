"""TrigFlow / sCM sampling math for SANA-Sprint, in one place and pure.

Every function here is tensor math with documented shapes: no I/O, no ``.item()``, no logging, no
model calls. The stream engine, the one-shot generator and the tests all use these, and the tests
prove that they reproduce diffusers' ``SanaSprintPipeline``/``SanaSprintImg2ImgPipeline``.

Conventions (DESIGN.md): angles ``t`` in (0, π/2]; ``σd`` = scheduler ``sigma_data`` (0.5).
A latent ``x`` at angle ``t`` is ``cos t · x0 + sin t · σd · ε`` where ``x0`` is the clean latent
``vae_latent · scaling_factor · σd``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: SANA-Sprint's recommended intermediate angle for two-step txt2img.
DEFAULT_INTERMEDIATE = 1.3
MAX_ANGLE = math.pi / 2


def txt2img_angles(steps: int, *, max_angle: float = MAX_ANGLE,
                   intermediate: float = DEFAULT_INTERMEDIATE) -> torch.Tensor:
    """Angles for txt2img: 1 → [π/2]; 2 → [π/2, 1.3]; n > 2 → linspace(π/2, 0, n+1)[:-1]. (n,) fp32."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 2:
        return torch.tensor([max_angle, intermediate], dtype=torch.float32)
    return torch.linspace(max_angle, 0, steps + 1, dtype=torch.float32)[:-1]


def img2img_angles(steps: int, strength: float) -> torch.Tensor:
    """Angles for img2img at ``strength`` σ ∈ (0, 1]: linspace(σ·π/2, 0, n+1)[:-1]. (n,) fp32."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return torch.linspace(strength * MAX_ANGLE, 0, steps + 1, dtype=torch.float32)[:-1]


def step_angles(mode: str, steps: int, strength: float, custom: Sequence[float] | None = None, *,
                intermediate: float = DEFAULT_INTERMEDIATE) -> torch.Tensor:
    """The step list of a stream: a custom list if given, else the defaults of ``mode``.

    ``intermediate`` is the model's second txt2img angle (``ModelComponents.intermediate_angle``):
    1.3 is SANA-Sprint's choice for its own weights, not a property of the sampler.
    """
    if custom is not None:
        return torch.tensor(list(custom), dtype=torch.float32)
    if mode == "txt2img":
        return txt2img_angles(steps, intermediate=intermediate)
    return img2img_angles(steps, strength)


def draw_noise(seed: int, shape: Sequence[int], count: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` standard-normal tensors of ``shape`` drawn as diffusers draws them for one image.

    diffusers seeds one CPU generator, draws the starting noise, then one fresh tensor per scheduler
    step; index 0 here is the entry noise, index k the re-noise after step k. (count, *shape) fp32.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    draws = [torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for _ in range(count)]
    return torch.stack(draws).to(device)


def entry_latent(t1: torch.Tensor, noise: torch.Tensor, sigma_data: float,
                 clean: torch.Tensor | None = None) -> torch.Tensor:
    """The first latent: ``σd·ε`` for txt2img (``clean`` is None) else ``cos t₁·clean + sin t₁·σd·ε``.

    ``t1`` (B,), ``noise`` and ``clean`` (B, C, h, w); ``clean = vae_latent · scaling_factor · σd``.
    """
    if clean is None:
        return noise * sigma_data
    t = _expand(t1)
    return torch.cos(t) * clean + torch.sin(t) * (noise * sigma_data)


def scm_timestep(t: torch.Tensor) -> torch.Tensor:
    """SCM timestep ``s = sin t / (sin t + cos t)`` fed to the transformer. (B,)"""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def model_input(x: torch.Tensor, t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale latents ``x`` (B, C, h, w) at angles ``t`` (B,) to the transformer's input; returns (x_in, s)."""
    s = scm_timestep(t)
    se = _expand(s)
    return (x / sigma_data) * torch.sqrt(se**2 + (1 - se) ** 2), s


def denoised(x: torch.Tensor, x_in: torch.Tensor, raw: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             sigma_data: float) -> torch.Tensor:
    """Clean-latent prediction ``x0 = cos t·x − sin t·F`` from the raw transformer output.

    The flow output ``raw`` is turned back into a TrigFlow prediction ``F`` exactly as diffusers
    does. All (B, C, h, w) except ``t``/``s`` (B,).
    """
    flow = trigflow_velocity(x_in, raw, s, sigma_data)
    te = _expand(t)
    return torch.cos(te) * x - torch.sin(te) * flow


def trigflow_velocity(x_in: torch.Tensor, raw: torch.Tensor, s: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The TrigFlow velocity ``dx/dt`` in sampler units (``σd·F``) from the raw transformer output.

    ``x0 = cos t·x − sin t·flow`` and ``σd·ε = sin t·x + cos t·flow``; defined at t = 0 too (the demo's
    DDIM inversion needs it). ``s`` (B,) is the SCM timestep of ``model_input``.
    """
    se = _expand(s)
    norm = torch.sqrt(se**2 + (1 - se) ** 2)
    flow = ((1 - 2 * se) * x_in + (1 - 2 * se + 2 * se**2) * raw) / norm
    return flow.float() * sigma_data


def renoise(x0: torch.Tensor, t_next: torch.Tensor, noise: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Move a clean prediction to angle ``t_next`` (B,) with fixed ``noise`` (B, C, h, w)."""
    te = _expand(t_next)
    return torch.cos(te) * x0 + torch.sin(te) * (noise * sigma_data)


def guidance_vector(guidance_scale: torch.Tensor, embeds_scale: float) -> torch.Tensor:
    """Per-sample guidance embedding input ``g · guidance_embeds_scale``. (B,)"""
    return guidance_scale * embeds_scale


def to_vae_latent(x0: torch.Tensor, sigma_data: float, scaling_factor: float) -> torch.Tensor:
    """Clean latent in sampler units → what ``vae.decode`` expects."""
    return x0 / sigma_data / scaling_factor


def from_vae_latent(z: torch.Tensor, sigma_data: float, scaling_factor: float) -> torch.Tensor:
    """``vae.encode(x).latent`` → clean latent in sampler units (``· scaling · σd``)."""
    return z * scaling_factor * sigma_data


def _expand(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)
