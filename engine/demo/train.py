"""``ditstream train-demo``: reproduce the demo model from scratch (autoencoder → teacher → one step).

Recipe (all seeded, see ``docs/demo_model_card.md``):

1. **Autoencoder.** A 4-level ``AutoencoderDC`` (f8, 16 latent channels) around a *designed* latent
   (``designed_latent``: per cell the shape class, colours and coverage): the encoder regresses it
   from pixels, the decoder draws from it; ``scaling_factor`` is 1/std of the designed latents. The
   teacher and the student learn from the exact designed latents of the training images. A second
   stage fine-tunes the decoder to draw crisp shapes from blurred latents too, as a one-step student
   makes them (``train_decoder_for_one_step``).
2. **Teacher.** A ``SanaTransformer2DModel`` trained as a TrigFlow flow model over t ∈ (0, π/2] with
   the exact SANA-Sprint parametrisation (σd = 0.5), jointly with a 2-layer ``Gemma2Model`` text
   encoder; 10 % caption dropout so that it can be sampled with classifier-free guidance.
3. **Distillation.** Reflow pairs along the teacher's ODE: by default real training images are carried
   to noise by the teacher's ODE run backwards (second-order DDIM in TrigFlow angles), so each
   trajectory ends on a real, correctly drawn image (``pairs_from="teacher"``: noise → teacher sample
   with CFG instead). The one-step student (initialised from the teacher) regresses the trajectory's
   end point from any point on it (trajectory/consistency distillation). At img2img entry angles it
   also learns from procedurally paired edits — the same geometry rendered with the prompt's colours —
   so that one-step img2img keeps the input's position while taking the prompt's colour, and from
   its own one-step output re-noised to an intermediate angle (what the second of two steps sees).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ditstream.engine import sampler
from ditstream.engine.demo import dataset as ds
from ditstream.engine.images import to_tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SIGMA_D = 0.5
#: Channels of the designed latent (``designed_latent``): class ×5, shape colour ×3, background ×3,
#: coverage, coverage of the four quarter cells (16 also divides AutoencoderDC's 64-channel shortcut).
LATENT_CHANNELS = len(ds.SHAPES) + 3 + 3 + 1 + 4
TEXT_HIDDEN = 64
#: Tokens per caption in training: "<bos> a red circle on a blue background" is 8; padding is masked
#: and the encoder is causal, so the embeddings equal those of the 300-token inference path.
TRAIN_TOKENS = 8
#: Tokens the served model pads prompts to (``ditstream.json`` ``max_sequence_length``): room for
#: longer prompts than the captions, and a tenth of the cross-attention of the 300-token default
#: (padding is masked, so the images are the same).
SERVE_TOKENS = 32


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the recipe; the defaults reproduce the shipped weights."""

    seed: int = 0
    device: str = "auto"
    threads: int = 1
    n_images: int = 8000
    ae_steps: int = 6000
    ae_batch: int = 16
    ae_lr: float = 2e-3
    #: Steps of ``train_decoder_for_one_step`` after the autoencoder (0: skip; decoder as trained).
    decoder_steps: int = 3000
    decoder_lr: float = 1e-3
    #: Most blur, in passes of a 3×3 binomial filter over the latent grid (drawn per sample, uniform,
    #: fractional passes interpolated), that the decoder learns to draw crisp shapes through. A
    #: one-step student predicts something like the mean of what its noise may become: its coverage
    #: comes out rounder than any drawn shape (about 1–2 passes), and a decoder trained on crisp
    #: latents then draws the round outline it sees, not the class the class channels name (before
    #: this stage: class channels right for 280/280 captions, one-step shape 56 %; one pass of blur
    #: over exact latents took the shape read from 94 to 69 %).
    decoder_blur: float = 3.0
    #: Share of the decoder stage's latents left unblurred, so that exact latents (img2img, the
    #: second of two steps) stay as crisp as before (all blurred: 92.5 → 83.5 % on exact latents).
    decoder_crisp: float = 0.5
    teacher_steps: int = 5000
    teacher_batch: int = 64
    teacher_lr: float = 1e-3
    caption_dropout: float = 0.1
    pairs: int = 8000
    teacher_sample_steps: int = 12
    #: Where the one-step student's txt2img pairs come from. ``"inversion"``: real training images
    #: carried to noise by the teacher's own ODE (DDIM run backwards), so every pair (noise → image)
    #: follows the teacher's flow but ends on a real, correctly shaped image. ``"teacher"``: classic
    #: reflow pairs, noise → teacher sample (the student then inherits the teacher's blobby shapes).
    pairs_from: str = "inversion"
    cfg_scale: float = 3.0
    student_steps: int = 2500
    student_batch: int = 32
    student_lr: float = 3e-4
    #: Share of the student's txt2img samples that are its own one-step prediction re-noised to an
    #: angle in ``second_step_angles`` (what the second of two steps sees), instead of teacher ODE
    #: states (which serving never feeds it).
    second_step_share: float = 0.25
    second_step_angles: tuple[float, float] = (0.3, 1.3)
    ema: float = 0.999
    transformer: dict[str, Any] = field(default_factory=lambda: dict(
        hidden=64, layers=4, heads=4))
    vae_channels: tuple[int, ...] = (8, 16, 32, 64)
    latent_channels: int = LATENT_CHANNELS
    #: Transformer patch size over the latent grid (2 on an f4 latent = the token grid of f8 at patch 1).
    patch_size: int = 1
    #: Teacher samples scored by the evaluator every this many steps (0: never); logged, not used.
    eval_every: int = 500
    image_size: int = 64
    #: Second angle of two-step txt2img, written to ``ditstream.json`` (SANA-Sprint's weights use 1.3).
    #: Chosen by a sweep of the shipped weights (model card): 0.7 / 0.9 / 1.1 / 1.3 give colour
    #: 96.4 / 98.2 / 99.6 / 99.3 % and shape 84.6 / 87.5 / 88.9 / 85.4 % (one step: 99.3 / 76.1 %).
    intermediate_angle: float = 1.1

    @property
    def latent_size(self) -> int:
        """Side of the latent grid: the image side over the autoencoder's 2^(levels−1) downsampling."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    @property
    def cell(self) -> int:
        """Pixels per latent cell along a side (8 for the shipped 64×64 model)."""
        return self.image_size // self.latent_size


# --------------------------------------------------------------------------- components

def build_components(cfg: TrainConfig) -> dict[str, Any]:
    """Untrained real-class components (same classes the loader uses for SANA-Sprint)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(cfg.seed)
    tokenizer = make_demo_tokenizer()
    n = len(cfg.vae_channels)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=cfg.latent_channels, attention_head_dim=8,
        encoder_block_types=("ResBlock",) * n, decoder_block_types=("ResBlock",) * n,
        encoder_block_out_channels=cfg.vae_channels, decoder_block_out_channels=cfg.vae_channels,
        encoder_qkv_multiscales=((),) * n, decoder_qkv_multiscales=((),) * n,
        encoder_layers_per_block=(1,) * n, decoder_layers_per_block=(1,) * n,
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=1.0,
    )
    t = cfg.transformer
    transformer = SanaTransformer2DModel(
        patch_size=cfg.patch_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        num_layers=t["layers"],
        num_attention_heads=t["heads"], attention_head_dim=t["hidden"] // t["heads"],
        num_cross_attention_heads=t["heads"], cross_attention_head_dim=t["hidden"] // t["heads"],
        cross_attention_dim=t["hidden"], caption_channels=TEXT_HIDDEN, sample_size=cfg.latent_size,
        qk_norm="rms_norm_across_heads", guidance_embeds=True, interpolation_scale=1,
    )
    text_encoder = Gemma2Model(Gemma2Config(
        hidden_size=TEXT_HIDDEN, head_dim=16, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, num_key_value_heads=4, vocab_size=len(tokenizer),
    ))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=SCMScheduler(sigma_data=SIGMA_D))


def make_demo_tokenizer():
    """Word-level tokenizer over the caption words that prepends ``<bos>`` like Gemma's.

    The ``<bos>`` matters: an empty prompt (the unconditional branch) still has one unmasked token,
    so cross-attention never sees an all-masked row.
    """
    from ditstream.engine.synthetic import make_tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer(ds.vocabulary())
    bos = tok.convert_tokens_to_ids("<bos>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok


# --------------------------------------------------------------------------- TrigFlow model call

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


# --------------------------------------------------------------------------- helpers

def tokenize(tokenizer, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer([c.lower().strip() for c in captions], padding="max_length", max_length=TRAIN_TOKENS,
                    truncation=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def encode_text(text_encoder, tokenizer, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokenize(tokenizer, captions, device)
    return text_encoder(ids, attention_mask=mask).last_hidden_state, mask


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


# --------------------------------------------------------------------------- stages

#: Magnitude of the shape-class channels: as loud as the colour channels, so that the diffusion loss
#: weighs "which shape" like "which colour".
CLASS_GAIN = 2.0


def designed_latent(specs: list[ds.ShapeSpec], cell: int, geometry: list[ds.ShapeSpec] | None = None) -> torch.Tensor:
    """The latent the autoencoder is trained to use, (N, 16, size/cell, size/cell), from the drawing specs.

    Why designed: with a freely learnt latent the shape class lives in faint sub-cell detail (per-cell
    PCA: colour variance ≈ 1, geometry 0.02–0.16) and no teacher trained on this CPU learnt to draw a
    named shape (it follows colour words, ignores shape words). Here the class is its own channels,
    as loud and as simple to predict as colour: with ``c`` the shape's coverage of each cell,
    channels 0–4 are ``CLASS_GAIN · c`` in the channel of its class, 5–7 the shape colour · c, 8–10
    the background colour · (1 − c), 11 is c and 12–15 the coverage of the cell's four quarters
    (finer position for img2img). ``geometry`` (same length) takes the coverage from other
    specs — used to teach the decoder to read the class from the class channels, not from the outline.
    """
    geometry = geometry or specs
    size = specs[0].size if specs else 64
    n = size // cell
    out = np.zeros((len(specs), LATENT_CHANNELS, n, n), np.float32)
    k = len(ds.SHAPES)
    for i, (s, g) in enumerate(zip(specs, geometry)):
        m = ds.shape_mask(g.shape, g.cx, g.cy, g.radius, size)
        c = m.reshape(n, cell, n, cell).mean((1, 3))
        quarters = m.reshape(n, 2, cell // 2, n, 2, cell // 2).mean((2, 5))  # (n, 2, n, 2)
        fg = np.asarray(ds.COLOURS[s.colour], np.float32) / 127.5 - 1.0
        bg = np.asarray(ds.COLOURS[s.background], np.float32) / 127.5 - 1.0
        out[i, ds.SHAPES.index(s.shape)] = CLASS_GAIN * c
        out[i, k : k + 3] = fg[:, None, None] * c
        out[i, k + 3 : k + 6] = bg[:, None, None] * (1.0 - c)
        out[i, k + 6] = c
        out[i, k + 7 :] = quarters.transpose(1, 3, 0, 2).reshape(4, n, n)
    return torch.from_numpy(out)


def blur_latents(z: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Blur each latent (B, C, h, w) by ``amount`` (B,) passes of a 3×3 binomial filter, edges replicated.

    Fractional amounts interpolate between whole passes, so the blur is continuous in ``amount``.
    """
    k = torch.tensor([1.0, 2.0, 1.0], device=z.device)
    k = (k[:, None] * k[None, :] / 16.0).expand(z.shape[1], 1, 3, 3)
    levels = [z]
    for _ in range(math.ceil(float(amount.max())) if len(amount) else 0):
        levels.append(F.conv2d(F.pad(levels[-1], (1, 1, 1, 1), mode="replicate"), k, groups=z.shape[1]))
    stack = torch.stack(levels)  # (passes + 1, B, C, h, w)
    lo = amount.floor().long().clamp(max=len(levels) - 1)
    hi = (lo + 1).clamp(max=len(levels) - 1)
    frac = (amount - lo).view(-1, 1, 1, 1)
    rows = torch.arange(len(z), device=z.device)
    return stack[lo, rows] * (1 - frac) + stack[hi, rows] * frac


def with_shape(spec: ds.ShapeSpec, shape: str) -> ds.ShapeSpec:
    """The same drawing (colours, position, size) as another shape class."""
    return replace(spec, shape=shape)


def other_shape(shape: str) -> str:
    """A fixed different class for ``shape`` (two along ``ds.SHAPES``): the "another shape's word" of
    the shape-following diagnostics."""
    return ds.SHAPES[(ds.SHAPES.index(shape) + 2) % len(ds.SHAPES)]


def decoder_inputs(batch: list[ds.ShapeSpec], cfg: TrainConfig, rng: np.random.Generator,
                   device: torch.device) -> torch.Tensor:
    """Designed latents for two decodes of each spec, each with the coverage of the same layout drawn
    as a random shape (see ``train_autoencoder``); the images to draw are ``batch`` twice."""
    donors = [with_shape(s, ds.SHAPES[int(rng.integers(len(ds.SHAPES)))]) for s in batch + batch]
    return designed_latent(batch + batch, cfg.cell, donors).to(device)


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


def clean_latents(specs: list[ds.ShapeSpec], cfg: TrainConfig, scale: float, device: torch.device,
                  geometry: list[ds.ShapeSpec] | None = None) -> torch.Tensor:
    """Exact clean latents ``x0 = designed latent · scaling_factor · σd`` of drawn specs.

    The teacher and the student learn from these rather than from the encoder's estimate of them:
    the encoder only serves img2img inputs, and its errors (a wrong class channel) would otherwise
    teach the generator a wrong class. ``geometry`` as in ``designed_latent``.
    """
    return designed_latent(specs, cfg.cell, geometry).to(device) * scale * SIGMA_D


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, scale: float, device: torch.device) -> torch.Tensor:
    """Clean latents ``x0 = latent · scaling_factor · σd`` (N, C, h, w) for the whole dataset."""
    out = [vae.encoder(to_tensor(images[i : i + 256], device)) for i in
           tqdm(range(0, len(images), 256), desc="encode latents", dynamic_ncols=True)]
    return torch.cat(out) * scale * SIGMA_D


def sample_train_t(n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """TrigFlow training angles: log-normal σ (tan t = σ/σd) plus 10 % exactly π/2 (txt2img start)."""
    sigma = torch.exp(torch.randn(n, generator=gen, device=device) * 1.4 - 0.4)
    t = torch.atan(sigma / SIGMA_D).clamp(1e-3, math.pi / 2)
    top = torch.rand(n, generator=gen, device=device) < 0.1
    return torch.where(top, torch.full_like(t, math.pi / 2), t)


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


def edit_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[ds.ShapeSpec]]:
    """(source images, target specs): same geometry, the prompt's colours/shape.

    A third are identity pairs (the prompt describes the input); the rest change the shape colour,
    and sometimes the background or the shape class.
    """
    src, tgt = [], []
    for _ in range(n):
        s = ds.random_spec(rng)
        if rng.random() < 0.33:
            t = s
        else:
            shape = s.shape if rng.random() < 0.7 else ds.SHAPES[int(rng.integers(len(ds.SHAPES)))]
            bg = s.background if rng.random() < 0.6 else ds.COLOUR_NAMES[int(rng.integers(len(ds.COLOUR_NAMES)))]
            colours = [c for c in ds.COLOUR_NAMES if c != bg]
            colour = colours[int(rng.integers(len(colours)))]
            t = replace(s, shape=shape, colour=colour, background=bg)
        src.append(ds.render(s))
        tgt.append(t)
    return np.stack(src), tgt


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


# --------------------------------------------------------------------------- driver

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_demo(out: str | Path, cfg: TrainConfig | None = None, *, default_strength: float = 0.5,
               workdir: str | Path | None = None) -> Path:
    """Run the whole recipe and save a diffusers-layout folder at ``out``.

    With ``workdir``, each finished stage leaves a checkpoint there and a rerun with the same
    config resumes after the last finished stage (a 45-minute CPU run should not restart from zero).
    """
    from ditstream.engine.synthetic import save_pipeline

    cfg = cfg or TrainConfig()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.time()
    comps = build_components(cfg)
    vae, transformer, text_encoder, tokenizer = (comps["vae"].to(device), comps["transformer"].to(device),
                                                 comps["text_encoder"].to(device), comps["tokenizer"])
    logger.info("generating %d procedural images", cfg.n_images)
    images, specs = ds.make_dataset(cfg.n_images, seed=cfg.seed)
    captions = [s.caption for s in specs]

    ckpt = Path(workdir) if workdir is not None else None
    resumed = []  # stages loaded from ``workdir``: their time is not in this run's timings
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and (ckpt / "autoencoder.pt").is_file():
        state = torch.load(ckpt / "autoencoder.pt", map_location=device)
        vae.load_state_dict(state["vae"])
        scale = state["scale"]
        rng.bit_generator.state = state["rng"]
        resumed.append("autoencoder")
        logger.info("resumed autoencoder from %s", ckpt)
    else:
        scale = train_autoencoder(vae, images, specs, cfg, device, rng)
        if ckpt is not None:
            torch.save({"vae": vae.state_dict(), "scale": scale, "rng": rng.bit_generator.state}, ckpt / "autoencoder.pt")
    vae.eval()
    vae.register_to_config(scaling_factor=scale)
    vae.requires_grad_(False)
    latents = clean_latents(specs, cfg, scale, device)
    if cfg.eval_every:
        log_decoder(vae, scale, cfg, device, "autoencoder")
    t_ae = time.time()

    if cfg.decoder_steps and ckpt is not None and (ckpt / "decoder.pt").is_file():
        vae.decoder.load_state_dict(torch.load(ckpt / "decoder.pt", map_location=device))
        resumed.append("decoder")
        logger.info("resumed decoder from %s", ckpt)
    elif cfg.decoder_steps:
        train_decoder_for_one_step(vae, images, specs, cfg, device)
        vae.requires_grad_(False)
        if ckpt is not None:
            torch.save(vae.decoder.state_dict(), ckpt / "decoder.pt")
        if cfg.eval_every:
            log_decoder(vae, scale, cfg, device, "decoder for one step")
    t_decoder = time.time()

    if ckpt is not None and (ckpt / "teacher.pt").is_file():
        state = torch.load(ckpt / "teacher.pt", map_location=device)
        transformer.load_state_dict(state["teacher"])
        text_encoder.load_state_dict(state["text_encoder"])
        text_encoder.eval().requires_grad_(False)
        teacher = transformer.eval().requires_grad_(False)
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        resumed.append("teacher")
        logger.info("resumed teacher from %s", ckpt)
    else:
        def probe(ema, step):
            logger.info("teacher step %d: %s", step,
                        probe_teacher(ema, text_encoder, tokenizer, vae, scale, cfg, device))

        teacher = train_teacher(transformer, text_encoder, tokenizer, latents, captions, cfg, device, gen, rng,
                                probe=probe)
        if ckpt is not None:
            torch.save({"teacher": teacher.state_dict(), "text_encoder": text_encoder.state_dict(),
                        "rng": rng.bit_generator.state, "gen": gen.get_state()}, ckpt / "teacher.pt")
    t_teacher = time.time()

    if cfg.pairs_from == "inversion":
        pairs = invert_pairs(teacher, text_encoder, tokenizer, latents, captions, cfg, device, rng)
    elif cfg.pairs_from == "teacher":
        pairs = make_pairs(teacher, text_encoder, tokenizer, cfg, device, gen)
    else:
        raise ValueError(f"pairs_from must be 'inversion' or 'teacher', got {cfg.pairs_from!r}")
    cap_table = {}
    with torch.no_grad():
        for c in ds.all_captions():
            text = ds.caption_for(*c)
            cap_table[text] = encode_text(text_encoder, tokenizer, [text], device)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    student = train_student(student, pairs, vae, scale, cap_table, cfg, device, gen, rng)
    t_end = time.time()

    comps.update(transformer=student.cpu(), vae=vae.cpu(), text_encoder=text_encoder.cpu())
    timings = {"autoencoder_s": round(t_ae - t0), "decoder_s": round(t_decoder - t_ae),
               "teacher_s": round(t_teacher - t_decoder),
               "distillation_s": round(t_end - t_teacher), "total_s": round(t_end - t0),
               "device": str(device), "resumed": resumed}
    extra = {"complex_human_instruction": False, "intermediate_angle": cfg.intermediate_angle,
             "max_sequence_length": SERVE_TOKENS,
             # The prompt a new user sees first (page, clients): the best-drawn class (circles are
             # 100 % in the model card) in a colour far from the page's red test pattern.
             "defaults": {"prompt": ds.caption_for("circle", "blue", "white"),
                          "width": 64, "height": 64, "steps": 1, "strength": default_strength,
                          "guidance_scale": cfg.cfg_scale},
             "training": {"config": _jsonable(asdict(cfg)), "timings": timings}}
    path = save_pipeline(comps, out, extra=extra)
    logger.info("saved demo model to %s (%s)", path, timings)
    return path


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
