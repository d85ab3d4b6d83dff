"""The demo LoRA ``swap``: the demo model with shape and background colours swapped.

Self-distillation, so the adapter learns one clean rule and nothing else: at any latent ``x`` and
angle ``t``, the model with the adapter and the caption "a C S on a B background" must predict what
the base model predicts at the same ``x`` and ``t`` for "a B S on a C background" (MSE on x0). Half
the samples are pure noise at t = π/2 (one-step txt2img); the rest are a base prediction re-noised to
a random angle in [0.15, 1.3] (img2img entries and the second of two steps). Rank-4 adapters on every
attention projection (self and cross) and on the caption projection; seeded; about a minute on
one CPU thread. The evaluator reads the style directly: the shape's colour is the caption's
background colour and the background the caption's shape colour (``swapped``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ditstream.engine import sampler
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import read_image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

NAME = "swap"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "caption_projection.linear_1", "caption_projection.linear_2")


@dataclass(frozen=True)
class LoraTrainConfig:
    """Every knob of the demo adapter; the defaults reproduce the shipped ``swap.safetensors``."""

    seed: int = 0
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    rank: int = 4
    guidance_scale: float = 3.0
    threads: int = 1


def swapped_caption(caption: tuple[str, str, str]) -> str:
    shape, colour, background = caption
    return ds.caption_for(shape, background, colour)


def _predict(transformer, c, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
             guidance: torch.Tensor) -> torch.Tensor:
    """x0 as the engine predicts it (``plan.predict_x0`` without the backend's inference mode)."""
    x_in, s = sampler.model_input(x, t, c.sigma_data)
    raw = transformer(x_in, encoder_hidden_states=emb, encoder_attention_mask=mask, guidance=guidance,
                      timestep=s, return_dict=False)[0]
    return sampler.denoised(x, x_in, raw, t, s, c.sigma_data)


def train_swap_lora(model: str | Path, out_dir: str | Path, cfg: LoraTrainConfig | None = None) -> Path:
    """Train ``swap`` on the model at ``model`` (a demo-model folder); write ``out_dir/swap.safetensors``."""
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components
    from ditstream.engine.prompt_cache import PromptCache
    from peft import LoraConfig

    cfg = cfg or LoraTrainConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    c = load_components(ModelConfig(model=str(model), device="cpu", dtype="fp32"))
    prompts = PromptCache(c, max_size=1024)
    caps = ds.all_captions()
    with torch.no_grad():
        own = [tuple(v.clone() for v in prompts.get(ds.caption_for(*cap))) for cap in caps]  # not inference
        swap = [tuple(v.clone() for v in prompts.get(swapped_caption(cap))) for cap in caps]  # tensors
    tr = c.transformer
    tr.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=list(TARGETS)), adapter_name=NAME)
    params = [p for n, p in tr.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    side = int((c.defaults or {}).get("width", 64)) // c.vae_scale_factor
    shape = (c.latent_channels, side, side)
    guidance = sampler.guidance_vector(torch.full((cfg.batch,), cfg.guidance_scale), c.guidance_embeds_scale)
    bar = tqdm(range(cfg.steps), desc="demo LoRA swap", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * (0.1 if step > 0.8 * cfg.steps else 1.0)
        idx = rng.integers(len(caps), size=cfg.batch)
        emb, mask = torch.cat([own[i][0] for i in idx]), torch.cat([own[i][1] for i in idx])
        emb_s, mask_s = torch.cat([swap[i][0] for i in idx]), torch.cat([swap[i][1] for i in idx])
        noise = torch.randn((cfg.batch, *shape), generator=gen)
        t = torch.full((cfg.batch,), math.pi / 2)
        x = noise * c.sigma_data
        renoised = torch.from_numpy(rng.random(cfg.batch) < 0.5)
        with torch.no_grad():
            tr.disable_adapters()
            if bool(renoised.any()):  # a base prediction (either caption) re-noised to a random angle
                pick = torch.from_numpy(rng.random(cfg.batch) < 0.5).view(-1, 1, 1)
                first = _predict(tr, c, x, t, torch.where(pick, emb, emb_s), torch.where(pick[..., 0], mask, mask_s),
                                 guidance)
                t2 = torch.from_numpy(rng.uniform(0.15, 1.3, size=cfg.batch)).float()
                x2 = sampler.renoise(first, t2, torch.randn(first.shape, generator=gen), c.sigma_data)
                x = torch.where(renoised.view(-1, 1, 1, 1), x2, x)
                t = torch.where(renoised, t2, t)
            target = _predict(tr, c, x, t, emb_s, mask_s, guidance)
            tr.enable_adapters()
            tr.set_adapters([NAME], [1.0])
        loss = (_predict(tr, c, x, t, emb, mask, guidance) - target).square().mean() / c.sigma_data**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr.save_lora_adapter(str(out), adapter_name=NAME, weight_name=f"{NAME}.safetensors")
    logger.info("saved demo LoRA %s to %s", NAME, out)
    return out / f"{NAME}.safetensors"


def swapped(image: np.ndarray, caption: tuple[str, str, str]) -> bool:
    """Whether the evaluator reads the swap style: shape in the caption's background colour and
    background in the caption's shape colour."""
    r = read_image(np.asarray(image))
    _, colour, background = caption
    return r.colour == background and r.background == colour
