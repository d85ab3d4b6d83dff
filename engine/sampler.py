"""TrigFlow / sCM sampling math for SANA-Sprint, in one place and pure.

Every function here is tensor math with documented shapes: no I/O, no ``.item()``, no logging, no
model calls, and no argument modified: where a function works in place, it is on a tensor it has
just made (the same operations in the same order, so the same bits, with one full-size allocation
less per operation, which on a CPU costs more than the arithmetic). The stream engine, the one-shot
generator and the tests all use these, and the tests prove that they reproduce diffusers'
``SanaSprintPipeline``/``SanaSprintImg2ImgPipeline``.

Conventions (DESIGN.md): angles ``t`` in (0, π/2]; ``σd`` = scheduler ``sigma_data`` (0.5).
A latent ``x`` at angle ``t`` is ``cos t · x0 + sin t · σd · ε`` where ``x0`` is the clean latent
``vae_latent · scaling_factor · σd``.
"""

from __future__ import annotations

import functools
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
    out = torch.cos(t) * clean
    return out.add_(torch.sin(t) * (noise * sigma_data))


def scm_timestep(t: torch.Tensor) -> torch.Tensor:
    """SCM timestep ``s = sin t / (sin t + cos t)`` fed to the transformer. (B,)"""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def model_input(x: torch.Tensor, t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale latents ``x`` (B, C, h, w) at angles ``t`` (B,) to the transformer's input; returns (x_in, s)."""
    s = scm_timestep(t)
    se = _expand(s)
    return (x / sigma_data).mul_(torch.sqrt(se**2 + (1 - se) ** 2)), s


def denoised(x: torch.Tensor, x_in: torch.Tensor, raw: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             sigma_data: float) -> torch.Tensor:
    """Clean-latent prediction ``x0 = cos t·x − sin t·F`` from the raw transformer output.

    The flow output ``raw`` is turned back into a TrigFlow prediction ``F`` exactly as diffusers
    does. All (B, C, h, w) except ``t``/``s`` (B,).
    """
    flow = trigflow_velocity(x_in, raw, s, sigma_data)
    te = _expand(t)
    return (torch.cos(te) * x).sub_(flow.mul_(torch.sin(te)))


def trigflow_velocity(x_in: torch.Tensor, raw: torch.Tensor, s: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The TrigFlow velocity ``dx/dt`` in sampler units (``σd·F``) from the raw transformer output.

    ``x0 = cos t·x − sin t·flow`` and ``σd·ε = sin t·x + cos t·flow``; defined at t = 0 too (the demo's
    DDIM inversion needs it). ``s`` (B,) is the SCM timestep of ``model_input``.
    """
    se = _expand(s)
    norm = torch.sqrt(se**2 + (1 - se) ** 2)
    flow = ((1 - 2 * se) * x_in).add_((1 - 2 * se + 2 * se**2) * raw).div_(norm)
    return flow.float().mul_(sigma_data)


def renoise(x0: torch.Tensor, t_next: torch.Tensor, noise: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Move a clean prediction to angle ``t_next`` (B,) with fixed ``noise`` (B, C, h, w)."""
    te = _expand(t_next)
    return (torch.cos(te) * x0).add_(torch.sin(te) * (noise * sigma_data))


def guidance_vector(guidance_scale: torch.Tensor, embeds_scale: float) -> torch.Tensor:
    """Per-sample guidance embedding input ``g · guidance_embeds_scale``. (B,)"""
    return guidance_scale * embeds_scale


def to_vae_latent(x0: torch.Tensor, sigma_data: float, scaling_factor: float) -> torch.Tensor:
    """Clean latent in sampler units → what ``vae.decode`` expects."""
    return (x0 / sigma_data).div_(scaling_factor)


def from_vae_latent(z: torch.Tensor, sigma_data: float, scaling_factor: float) -> torch.Tensor:
    """``vae.encode(x).latent`` → clean latent in sampler units (``· scaling · σd``)."""
    return (z * scaling_factor).mul_(sigma_data)


# ------------------------------------------------------------------ blends, glides and feedback
#
# Live control (prompt and seed blends, transitions between configs, latent feedback) is arithmetic
# on tensors the plan already holds: cached prompt embeddings, fixed noise, clean latents. None of
# it calls the text encoder or the model, so a blend or a glide costs a few element-wise ops per
# frame. Entries of weight 0 are dropped before mixing and a single remaining entry is returned
# unchanged, so ``{A: 1, B: 0}`` is exactly A and a one-seed list is exactly that seed.

def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1 (all ≥ 0, at least one > 0; ``StreamConfig.validate`` checks)."""
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """``(1 − t)·a + t·b``; ``t`` a number (0 and 1 return ``a``/``b`` exactly) or a tensor broadcasting
    against ``a``."""
    if isinstance(t, (int, float)):
        if t <= 0:
            return a
        if t >= 1:
            return b
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, dim: int = -1, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation of the vectors of ``a`` and ``b`` along ``dim`` (same shapes).

    Why spherical: the mean of two independent Gaussian noises has √½ of their norm (a washed-out,
    low-contrast image), and a linear mix of two text embeddings passes through a shorter vector
    than either; slerp follows the arc between the directions and interpolates the norms linearly,
    so every point of the path is as "loud" as its ends. Nearly parallel vectors (angle < ``eps``)
    fall back to ``lerp``; ``t`` = 0 or 1 returns ``a`` or ``b`` exactly. Computed in fp32, returned
    in ``a``'s dtype.
    """
    if t <= 0.0:
        return a
    if t >= 1.0:
        return b
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(dim=dim, keepdim=True), b32.norm(dim=dim, keepdim=True)
    ua, ub = a32 / na.clamp_min(1e-12), b32 / nb.clamp_min(1e-12)
    omega = torch.acos((ua * ub).sum(dim=dim, keepdim=True).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so.clamp_min(1e-12)
    arc = direction * ((1 - t) * na + t * nb)
    out = torch.where(omega < eps, a32 + (b32 - a32) * t, arc)
    return out.to(a.dtype)


def blend(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str = "linear", *,
          dim: int = -1) -> torch.Tensor:
    """Weighted mix of same-shape tensors: ``"linear"`` (weighted mean) or ``"slerp"`` along ``dim``.

    More than two entries are slerped one at a time (``acc ← slerp(acc, xᵢ, wᵢ / Σ_{j≤i} wⱼ)``), which
    is the weighted mean for ``"linear"`` and order-dependent only in the rounding for two entries.
    Zero weights are dropped first; one entry left is returned as it is (bit-exact).
    """
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    kept = [(x, w) for x, w in zip(tensors, normalise_weights(weights)) if w > 0]
    if len(kept) == 1:
        return kept[0][0]
    if method == "linear":
        out = sum(x.float() * w for x, w in kept)
        return out.to(kept[0][0].dtype)
    if method != "slerp":
        raise ValueError(f"unknown interpolation {method!r}")
    acc, total = kept[0][0], kept[0][1]
    for x, w in kept[1:]:
        total += w
        acc = slerp(acc, x, w / total, dim=dim)
    return acc


def blend_embeddings(embeds: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], weights: Sequence[float],
                     method: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Mix prompt embeddings ``(1, Lᵢ, D)`` with attention masks ``(1, Lᵢ)`` → ``((1, L, D), (1, L))``.

    Shorter ones are zero-padded to the longest ``L`` (mask 0 there); each token position is mixed
    across prompts (slerp per token vector for ``"slerp"``) and the mask is the union of the masks
    of the prompts with weight > 0, so every token any weighted prompt attends to stays visible.
    Zero-weight prompts take no part at all (neither embedding nor mask).
    """
    kept = [(e, m, w) for e, m, w in zip(embeds, masks, weights, strict=True) if w > 0]
    if not kept:
        raise ValueError("at least one weight must be > 0")
    if len(kept) == 1:
        return kept[0][0], kept[0][1]
    length = max(e.shape[1] for e, _, _ in kept)
    es = [torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e, _, _ in kept]
    ms = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for _, m, _ in kept]
    mask = torch.stack(ms).amax(dim=0)
    return blend(es, [w for _, _, w in kept], method, dim=-1), mask


def blend_noise(noises: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Slerp of fixed noises ``(n, C, h, w)`` (each of the n draws as one vector), at unit variance.

    A seed blend must still look like one N(0, 1) draw to the model: slerp keeps the norm of two
    independent draws (a linear mean would shrink it by √½), and each mixed draw is then rescaled to
    mean square 1 so that three or more seeds, or nearly parallel ones, do not drift. One entry left
    (e.g. ``[{"seed": s}]``) is returned unchanged: exactly seed s's noise.
    """
    kept = [(x, w) for x, w in zip(noises, weights, strict=True) if w > 0]
    if len(kept) == 1:
        return kept[0][0]
    shape = kept[0][0].shape
    flat = blend([x.reshape(shape[0], -1) for x, _ in kept], [w for _, w in kept], "slerp", dim=-1)
    flat = flat * torch.rsqrt(flat.float().pow(2).mean(dim=-1, keepdim=True)).to(flat.dtype)
    return flat.reshape(shape)


def feedback_blend(clean: torch.Tensor, previous: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """Latent feedback: the clean latent a frame enters with, ``(1 − f)·clean + f·previous``.

    ``clean`` is the new input's encoded latent and ``previous`` the stream's last output latent
    (both (B, C, h, w), sampler units), ``feedback`` (B,) in [0, 1). Mixing before the entry noise is
    the same as mixing the two noised entry latents (the noise is fixed per stream). Why: frame-to-
    frame jitter of the input (sensor noise, compression) enters only with weight 1 − f and the
    output becomes a leaky average of past outputs — steadier, at the cost of following motion with
    a lag of about f / (1 − f) frames.
    """
    f = _expand(feedback.to(clean.dtype))
    return clean + (previous - clean) * f


def _expand(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def feedback_weights(values: list[float], device: torch.device) -> torch.Tensor:
    """(B,) float32 feedback weights on ``device``, from per-value device scalars made once.

    ``torch.tensor(values, device=cuda)`` would copy a host list to the device on every tick (a
    stream synchronisation); concatenating cached device scalars is a device-side copy only."""
    return torch.cat([_weight_scalar(float(v), torch.device(device)) for v in values])


@functools.lru_cache(maxsize=256)
def _weight_scalar(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)
