"""The designed latent of the demo autoencoder: what each cell holds, its blur (as a one-step student
makes it), and the procedurally paired edits the student learns img2img from."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.config import LATENT_CHANNELS, SIGMA_D, TrainConfig
from ditstream.engine.images import to_tensor
from tqdm.auto import tqdm

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
