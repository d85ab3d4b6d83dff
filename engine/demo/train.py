"""The stage trainers of the demo recipe (``recipe.train_demo`` runs them in order, see its docstring):
the autoencoder, the decoder tuned for one-step outputs, the TrigFlow teacher and the one-step student,
with the optimiser helpers they share."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.components import encode_text
from ditstream.engine.demo.config import LATENT_CHANNELS, SIGMA_D, TrainConfig
from ditstream.engine.demo.latents import (
    blur_latents,
    clean_latents,
    decoder_inputs,
    designed_latent,
    edit_batch,
)
from ditstream.engine.demo.trigflow import add_noise, sample_train_t, trigflow_x0
from ditstream.engine.images import to_tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, flat, then linear decay over the last 30 %."""
    if step < warmup:
        return base * (step + 1) / warmup
    tail = int(0.7 * total)
    if step < tail:
        return base
    return base * max(0.05, (total - step) / max(total - tail, 1))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, bar, step: int,
                   clip: list[torch.nn.Parameter] | None = None) -> None:
    """One update of every training stage: backward, optional gradient clipping to norm 1, step; the
    loss goes on the progress bar every 20 steps (reading it syncs a GPU, so not every step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    if step % 20 == 0:
        bar.set_postfix(loss=f"{loss.item():.4f}")


def train_autoencoder(vae, images: np.ndarray, specs: list[ds.ShapeSpec], cfg: TrainConfig, device: torch.device,
                      rng: np.random.Generator) -> float:
    """Train encoder and decoder around the designed latent; return the scaling factor (1 / its std).

    The encoder regresses ``designed_latent`` from pixels (img2img needs it). The decoder learns to
    draw the image from designed latents whose coverage channels always come from the same layout
    drawn as a random shape (the same one a fifth of the time): the outline in the coverage then says
    nothing about the class, so the decoder must take the class from the class channels and only
    position and size from the coverage. (Trained with the true coverage half of the time, or on the
    encoder's output, it learnt to read the class from the outline: fed another shape's class
    channels it drew the named shape 31 % of the time.) A little latent noise keeps it tolerant of
    sampler output; ``train_decoder_for_one_step`` then teaches it to undo a one-step student's blur.
    """
    if cfg.latent_channels != LATENT_CHANNELS:
        raise ValueError(f"the demo autoencoder's designed latent has {LATENT_CHANNELS} channels; "
                         f"got latent_channels={cfg.latent_channels}")
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.ae_steps), desc="autoencoder", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, lr_at(step, cfg.ae_steps, cfg.ae_lr))
        idx = rng.integers(len(images), size=cfg.ae_batch)
        batch = [specs[i] for i in idx]
        x = to_tensor(images[idx], device)
        z = vae.encoder(x)
        z_in = decoder_inputs(batch, cfg, rng, device)
        rec = vae.decoder(z_in + 0.05 * torch.randn_like(z_in))
        target = designed_latent(batch, cfg.cell).to(device)
        xx = torch.cat([x, x])
        loss = F.l1_loss(rec, xx) + F.mse_loss(rec, xx) + 10.0 * F.mse_loss(z, target)
        optimizer_step(opt, loss, bar, step)
    vae.eval()
    return float(1.0 / designed_latent(specs[:2048], cfg.cell).std())


def train_decoder_for_one_step(vae, images: np.ndarray, specs: list[ds.ShapeSpec], cfg: TrainConfig,
                               device: torch.device) -> None:
    """Fine-tune the decoder to draw crisp shapes from blurred latents, as a one-step student makes them.

    Same objective as the autoencoder's decoder, but all except a ``decoder_crisp`` share of its
    designed latents are blurred by a random 0–``decoder_blur`` passes (why: ``TrainConfig.decoder_blur``).
    A stage after a crisp autoencoder rather than blur from the start: blurred from step 0 (6000
    steps) the decoder drew exact latents' shapes 77 % of the time and the one-step student's 63–68 %;
    fine-tuned after the crisp stage it keeps the first (92.5 %) and gains more of the second (figures
    in the model card). The encoder, the scaling factor and the later stages' random streams are
    untouched (own generators), so teacher and student are what they would be without this stage.
    """
    rng = np.random.default_rng([cfg.seed, 1])
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    vae.train()
    vae.decoder.requires_grad_(True)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.decoder_steps), desc="decoder for one step", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, lr_at(step, cfg.decoder_steps, cfg.decoder_lr, warmup=50))
        idx = rng.integers(len(images), size=cfg.ae_batch)
        z = decoder_inputs([specs[i] for i in idx], cfg, rng, device)
        amount = torch.rand(len(z), generator=gen, device=device) * cfg.decoder_blur
        crisp = torch.rand(len(z), generator=gen, device=device) < cfg.decoder_crisp
        z = blur_latents(z, amount.masked_fill(crisp, 0.0))
        rec = vae.decoder(z + 0.05 * torch.randn(z.shape, generator=gen, device=device))
        x = to_tensor(images[idx], device)
        xx = torch.cat([x, x])
        loss = F.l1_loss(rec, xx) + F.mse_loss(rec, xx)
        optimizer_step(opt, loss, bar, step)
    vae.eval()


def train_teacher(transformer, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str],
                  cfg: TrainConfig, device: torch.device, gen: torch.Generator,
                  rng: np.random.Generator, probe=None) -> torch.nn.Module:
    """TrigFlow flow matching; returns the EMA teacher.

    ``probe(ema, step)`` (optional) is called every ``cfg.eval_every`` steps to log sample quality.
    """
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=0.0)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    bar = tqdm(range(cfg.teacher_steps), desc="teacher", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, lr_at(step, cfg.teacher_steps, cfg.teacher_lr))
        idx = rng.integers(len(latents), size=cfg.teacher_batch)
        x0 = latents[idx]
        caps = ["" if rng.random() < cfg.caption_dropout else captions[i] for i in idx]
        emb, mask = encode_text(text_encoder, tokenizer, caps, device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = sample_train_t(len(idx), device, gen)
        xt = add_noise(x0, noise, t)
        pred = trigflow_x0(transformer, xt, t, emb, mask, cfg.cfg_scale)
        # Loss on the TrigFlow velocity F (x0 error / sin t), the sCM training target.
        tt = t.view(-1, 1, 1, 1)
        loss = ((pred - x0) / torch.sin(tt).clamp_min(0.05)).square().mean() / SIGMA_D**2
        optimizer_step(opt, loss, bar, step, clip=params)
        ema_update(ema, transformer, cfg.ema if step > 200 else 0.0)
        if probe is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            text_encoder.eval()
            probe(ema, step + 1)
            text_encoder.train()
    text_encoder.eval().requires_grad_(False)
    return ema


def train_student(student, teacher_pairs, vae, scale: float, cap_table: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  cfg: TrainConfig, device: torch.device, gen: torch.Generator,
                  rng: np.random.Generator) -> torch.nn.Module:
    """One-step distillation; returns the EMA student."""
    states, angles, ends, pair_caps = teacher_pairs
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr, weight_decay=0.0)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    half = cfg.student_batch // 2
    bar = tqdm(range(cfg.student_steps), desc="distil one-step", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, lr_at(step, cfg.student_steps, cfg.student_lr))
        # (a) trajectory points → teacher end point; half of them at t = π/2 (txt2img).
        idx = torch.from_numpy(rng.integers(len(ends), size=half)).to(device)
        u = rng.random(half)
        k = torch.from_numpy(np.where(u < 0.5, 0, rng.integers(len(angles), size=half))).to(device)
        xa, ta, ya = states[idx, k], angles[k], ends[idx]
        ca = [pair_caps[int(i)] for i in idx]
        emb_a = torch.cat([cap_table[c][0] for c in ca])
        mask_a = torch.cat([cap_table[c][1] for c in ca])
        # (a') what the second of two steps sees: the student's own one-step prediction re-noised with
        # fresh noise to an intermediate angle, → the same end point.
        second = torch.from_numpy(u >= 1.0 - cfg.second_step_share).to(device)
        if bool(second.any()):
            n2 = int(second.sum())
            with torch.no_grad():
                first = trigflow_x0(student, states[idx[second], 0], angles[:1].expand(n2), emb_a[second],
                                    mask_a[second], cfg.cfg_scale)
            t2 = torch.from_numpy(rng.uniform(*cfg.second_step_angles, size=n2)).float().to(device)
            xa, ta = xa.clone(), ta.clone()
            xa[second] = add_noise(first, torch.randn(first.shape, generator=gen, device=device), t2)
            ta[second] = t2
        # (b) img2img entry angles: paired edits and identity pairs from real data.
        src, tgt = edit_batch(rng, cfg.student_batch - half)
        cb = [t.caption for t in tgt]
        with torch.no_grad():
            zs = vae.encoder(to_tensor(src, device)) * scale * SIGMA_D  # what img2img serves from
            yb = clean_latents(tgt, cfg, scale, device)
        tb = torch.from_numpy(rng.uniform(0.15, 0.9, size=len(cb)) * math.pi / 2).float().to(device)
        xb = add_noise(zs, torch.randn(zs.shape, generator=gen, device=device), tb)
        x, t, y = torch.cat([xa, xb]), torch.cat([ta, tb]), torch.cat([ya, yb])
        emb = torch.cat([emb_a] + [cap_table[c][0] for c in cb])
        mask = torch.cat([mask_a] + [cap_table[c][1] for c in cb])
        pred = trigflow_x0(student, x, t, emb, mask, cfg.cfg_scale)
        loss = (pred - y).square().mean() / SIGMA_D**2
        optimizer_step(opt, loss, bar, step, clip=list(student.parameters()))
        ema_update(ema, student, 0.995 if step > 100 else 0.0)
    return ema


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
