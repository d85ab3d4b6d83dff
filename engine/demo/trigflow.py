"""TrigFlow for training: the model call through ``engine.sampler``, the teacher's ODE (DDIM and
second-order steps, with CFG) and the reflow pairs the student is distilled from."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from ditstream.engine import sampler
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.components import encode_text
from ditstream.engine.demo.config import SIGMA_D, TrainConfig
from tqdm.auto import tqdm


def trigflow_x0(transformer, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
                guidance: float) -> torch.Tensor:
    """Predicted clean latent ``x0`` (B, C, h, w) at angles ``t`` (B,) — SANA-Sprint's parametrisation,
    through ``engine.sampler`` so that training and serving share one piece of math."""
    flow = trigflow_flow(transformer, x, t, emb, mask, guidance)
    tt = t.view(-1, 1, 1, 1)
    return torch.cos(tt) * x - torch.sin(tt) * flow


def trigflow_flow(transformer, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    """The predicted TrigFlow velocity ``dx/dt`` (sampler units, = σd·F) at angles ``t``
    (``engine.sampler.trigflow_velocity``); defined at t = 0 too, which ``invert_pairs`` needs."""
    x_in, s = sampler.model_input(x, t, SIGMA_D)
    g = torch.full((x.shape[0],), guidance * transformer.config.guidance_embeds_scale, device=x.device)
    raw = transformer(x_in, encoder_hidden_states=emb, encoder_attention_mask=mask, guidance=g,
                      timestep=s, return_dict=False)[0]
    return sampler.trigflow_velocity(x_in, raw, s, SIGMA_D)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return sampler.renoise(x0, t, noise, SIGMA_D)


def sample_train_t(n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """TrigFlow training angles: log-normal σ (tan t = σ/σd) plus 10 % exactly π/2 (txt2img start)."""
    sigma = torch.exp(torch.randn(n, generator=gen, device=device) * 1.4 - 0.4)
    t = torch.atan(sigma / SIGMA_D).clamp(1e-3, math.pi / 2)
    top = torch.rand(n, generator=gen, device=device) < 0.1
    return torch.where(top, torch.full_like(t, math.pi / 2), t)


def teacher_angles(n: int, t_start: float = math.pi / 2) -> list[float]:
    return list(np.linspace(t_start, 0.0, n + 1)[:-1])


@torch.no_grad()
def teacher_sample(teacher, x: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor, uemb: torch.Tensor,
                   umask: torch.Tensor, cfg: TrainConfig, angles: list[float]) -> list[torch.Tensor]:
    """Deterministic DDIM in TrigFlow angles with CFG; returns the states at ``angles`` plus x0."""
    states = []
    b = x.shape[0]
    for k, a in enumerate(angles):
        states.append(x)
        t = torch.full((b,), a, device=x.device)
        both = trigflow_x0(teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb, uemb]),
                           torch.cat([mask, umask]), cfg.cfg_scale)
        cond, unc = both.chunk(2)
        x0 = unc + cfg.cfg_scale * (cond - unc)
        eps = (x - math.cos(a) * x0) / (math.sin(a) * SIGMA_D)
        nxt = angles[k + 1] if k + 1 < len(angles) else 0.0
        x = math.cos(nxt) * x0 + math.sin(nxt) * SIGMA_D * eps
    states.append(x)
    return states


def make_pairs(teacher, text_encoder, tokenizer, cfg: TrainConfig, device: torch.device,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Teacher trajectories from noise: (states (N, K, C, h, w), angles (K,), x0 (N, C, h, w), caption ids)."""
    caps = ds.all_captions()
    cap_ids = [i % len(caps) for i in range(cfg.pairs)]
    angles = teacher_angles(cfg.teacher_sample_steps)
    all_states, ends = [], []
    uemb, umask = encode_text(text_encoder, tokenizer, [""], device)
    bs = 128
    for i in tqdm(range(0, cfg.pairs, bs), desc="teacher pairs", dynamic_ncols=True):
        ids = cap_ids[i : i + bs]
        emb, mask = encode_text(text_encoder, tokenizer, [ds.caption_for(*caps[j]) for j in ids], device)
        noise = torch.randn((len(ids), cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=gen,
                            device=device) * SIGMA_D
        states = teacher_sample(teacher, noise, emb, mask, uemb.expand(len(ids), -1, -1),
                                umask.expand(len(ids), -1), cfg, angles)
        all_states.append(torch.stack(states[:-1], 1))
        ends.append(states[-1])
    return (torch.cat(all_states), torch.tensor(angles, dtype=torch.float32, device=device), torch.cat(ends),
            [ds.caption_for(*caps[j]) for j in cap_ids])


def heun_step(teacher, x: torch.Tensor, a: float, b: float, emb: torch.Tensor, mask: torch.Tensor,
              guidance: float) -> torch.Tensor:
    """Second-order DDIM step from angle ``a`` to ``b`` (either direction): predict x0 at ``a``, take a
    DDIM step, predict x0 again at ``b``, and step from ``a`` with the average x0 and the noise that
    average implies for the current state. Plain DDIM inversion in 12 steps loses the shape on the
    way back."""
    def predict(x: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
        f = trigflow_flow(teacher, x, torch.full((x.shape[0],), angle, device=x.device), emb, mask, guidance)
        c, s = math.cos(angle), math.sin(angle)
        return c * x - s * f, s * x + c * f

    x0a, ea = predict(x, a)
    x0b, eb = predict(math.cos(b) * x0a + math.sin(b) * ea, b)
    x0 = 0.5 * (x0a + x0b)
    # The noise that, with the averaged x0, is consistent with the current state (undefined at a = 0).
    eps = (x - math.cos(a) * x0) / math.sin(a) if math.sin(a) > 1e-3 else 0.5 * (ea + eb)
    return math.cos(b) * x0 + math.sin(b) * eps


@torch.no_grad()
def invert_pairs(teacher, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str], cfg: TrainConfig,
                 device: torch.device, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Reflow pairs with real end points: DDIM inversion of training latents along the teacher's ODE.

    In TrigFlow a DDIM step from angle a to b is the rotation ``x_b = cos(b−a)·x + sin(b−a)·flow(x, a)``;
    run from 0 up to π/2 (conditional teacher, no CFG: inversion with guidance drifts) it carries a
    real image to the noise the teacher would turn back into it. Returns the same layout as
    ``make_pairs``: states at the forward angles (π/2 … Δ), those angles, the real x0, captions.
    """
    idx = rng.choice(len(latents), size=min(cfg.pairs, len(latents)), replace=False)
    up = list(np.linspace(0.0, math.pi / 2, cfg.teacher_sample_steps + 1))
    all_states, ends, caps = [], [], []
    bs = 128
    for i in tqdm(range(0, len(idx), bs), desc="invert pairs", dynamic_ncols=True):
        sel = idx[i : i + bs]
        c = [captions[j] for j in sel]
        emb, mask = encode_text(text_encoder, tokenizer, c, device)
        x0 = latents[torch.from_numpy(sel).to(device)]
        x, states = x0, []
        for a, b in itertools.pairwise(up):
            x = heun_step(teacher, x, a, b, emb, mask, cfg.cfg_scale)
            states.append(x)
        # The inverted noise comes out a little narrower than N(0, σd²) (the teacher is not exact);
        # rescale the start state per sample so that the student sees the noise it gets at serving.
        states[-1] = states[-1] / states[-1].flatten(1).std(1).view(-1, 1, 1, 1) * SIGMA_D
        all_states.append(torch.stack(states[::-1], 1))  # forward order: π/2 first
        ends.append(x0)
        caps.extend(c)
    angles = torch.tensor(up[1:][::-1], dtype=torch.float32, device=device)
    return torch.cat(all_states), angles, torch.cat(ends), caps
