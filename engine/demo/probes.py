"""What train-demo logs while it trains: teacher probes, shape following, the decoder on blurred latents."""

from __future__ import annotations

import logging

import numpy as np
import torch
from ditstream.engine import sampler
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.components import encode_text
from ditstream.engine.demo.config import SIGMA_D, TrainConfig
from ditstream.engine.demo.latents import blur_latents, clean_latents, encode_latents, other_shape, with_shape
from ditstream.engine.demo.trigflow import add_noise, teacher_angles, teacher_sample, trigflow_x0

logger = logging.getLogger(__name__)


@torch.no_grad()
def probe_teacher(teacher, text_encoder, tokenizer, vae, scale: float, cfg: TrainConfig, device: torch.device,
                  n: int = 40, steps: int = 8) -> dict[str, float]:
    """Score ``n`` teacher samples (``steps``-step DDIM, CFG) over spread captions with the evaluator."""
    from ditstream.engine.demo.evaluator import score

    caps = ds.all_captions()
    chosen = [caps[(i * 17) % len(caps)] for i in range(n)]
    gen = torch.Generator(device=device).manual_seed(1234)
    emb, mask = encode_text(text_encoder, tokenizer, [ds.caption_for(*c) for c in chosen], device)
    uemb, umask = encode_text(text_encoder, tokenizer, [""], device)
    noise = torch.randn((n, cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=gen,
                        device=device) * SIGMA_D
    x0 = teacher_sample(teacher, noise, emb, mask, uemb.expand(n, -1, -1), umask.expand(n, -1), cfg,
                        teacher_angles(steps))[-1]
    images = decode_images(vae, x0, scale)
    follows = shape_following(teacher, text_encoder, tokenizer, vae, scale, cfg, device)
    return {**score(images, chosen).as_dict(), "follows_own_shape": follows["own"],
            "follows_other_shape": follows["other"]}


@torch.no_grad()
def shape_following(model, text_encoder, tokenizer, vae, scale: float, cfg: TrainConfig, device: torch.device,
                    n: int = 200, angle: float = 1.0) -> dict[str, float]:
    """Does the model draw the shape its caption names? The diagnosis behind the demo's shape gap.

    ``n`` real images are noised to ``angle`` (1.0: σ ≈ 0.8, the shape still readable in the input)
    and predicted back to x0 once with their own caption and once with a caption naming another
    shape (same colours). Returns the share read as the captioned shape in each case. A model that
    uses the shape word scores high on both; one that only denoises what it sees scores ~0.2 (chance)
    on ``"other"`` — the learnt-latent teacher's 0.18 after 5000 steps (it followed colour words).
    """
    from ditstream.engine.demo.evaluator import score

    _, specs = ds.make_dataset(n, seed=cfg.seed + 5)
    x0 = clean_latents(specs, cfg, scale, device)
    gen = torch.Generator(device=device).manual_seed(0)
    t = torch.full((n,), angle, device=device)
    xt = add_noise(x0, torch.randn(x0.shape, generator=gen, device=device), t)
    own = [(s.shape, s.colour, s.background) for s in specs]
    other = [(other_shape(s.shape), s.colour, s.background) for s in specs]
    out = {}
    for name, caps in (("own", own), ("other", other)):
        emb, mask = encode_text(text_encoder, tokenizer, [ds.caption_for(*c) for c in caps], device)
        pred = trigflow_x0(model, xt, t, emb, mask, cfg.cfg_scale)
        out[name] = score(decode_images(vae, pred, scale), caps).shape
    return out


@torch.no_grad()
def decode_images(vae, x0: torch.Tensor, scale: float) -> np.ndarray:
    """Clean latents → uint8 (B, H, W, 3), the inverse of ``encode_latents``, rounded as the engine serves."""
    from ditstream.engine import images

    return images.to_uint8(images.to_unit(vae.decoder(sampler.to_vae_latent(x0, SIGMA_D, scale))))


@torch.no_grad()
def log_decoder(vae, scale: float, cfg: TrainConfig, device: torch.device, stage: str) -> None:
    """Log what the decoder draws, on 200 held-out images: their encoder reconstructions; exact
    latents whose class channels name another shape than their coverage (txt2img relies on the
    class channels); and exact latents blurred by 1.5 passes (about a one-step student's blur)."""
    from ditstream.engine.demo.evaluator import score

    held, held_specs = ds.make_dataset(200, seed=cfg.seed + 1)
    targets = [(s.shape, s.colour, s.background) for s in held_specs]
    rec = decode_images(vae, encode_latents(vae, held, scale, device), scale)
    named = [with_shape(s, other_shape(s.shape)) for s in held_specs]
    z = clean_latents(named, cfg, scale, device, geometry=held_specs)
    blurred = blur_latents(clean_latents(held_specs, cfg, scale, device), torch.full((len(held),), 1.5, device=device))
    logger.info("%s — reconstructions: %s", stage, score(rec, targets).as_dict())
    logger.info("%s — draws the class channels' shape: %s", stage,
                score(decode_images(vae, z, scale), [(s.shape, s.colour, s.background) for s in named]).as_dict())
    logger.info("%s — blurred latents (1.5 passes): %s", stage, score(decode_images(vae, blurred, scale), targets).as_dict())
