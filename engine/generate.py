"""One-shot sequential sampling: the reference path for ``ditstream generate`` and parity tests.

Runs a frame through all of its steps one model call at a time, with the same plan (noise, angles,
embedding) the stream engine uses, so "stream batch equals sequential sampling" is a direct test.
"""

from __future__ import annotations

import numpy as np
import torch
from ditstream.engine import images as imgs
from ditstream.engine import sampler
from ditstream.engine.backends import create_backend
from ditstream.engine.backends.base import Backend
from ditstream.engine.config import ModelConfig, StreamConfig
from ditstream.engine.errors import GenerationError
from ditstream.engine.limits import EngineLimits, check_input, ensure_valid
from ditstream.engine.loader import ModelComponents, load_components
from ditstream.engine.plan import Plan, decode_clean, encode_clean, make_plan, predict_x0
from ditstream.engine.prompt_cache import PromptCache

#: Largest image (width × height) a Generator makes, and the largest input ``ditstream generate
#: --image`` reads (refused from its header before decoding; the input is then resized).
MAX_PIXELS = 4096 * 4096


class Generator:
    """Sequential txt2img/img2img on a loaded model."""

    def __init__(self, components: ModelComponents, backend: Backend | None = None,
                 prompts: PromptCache | None = None) -> None:
        self.components = components
        self.backend = backend if backend is not None else create_backend("torch", components)
        self.prompts = prompts if prompts is not None else PromptCache(components)

    @classmethod
    def from_config(cls, config: ModelConfig) -> Generator:
        components = load_components(config)
        return cls(components, create_backend(config.backend, components, config.backend_options),
                   PromptCache(components, config.prompt_cache_size))

    @property
    def size_multiple(self) -> int:
        return self.components.vae_scale_factor * int(self.components.transformer.config.patch_size)

    @property
    def limits(self) -> EngineLimits:
        """What a one-shot generation accepts: the model's size multiple, the backend's profile, the loaded LoRAs."""
        return EngineLimits(size_multiple=self.size_multiple, max_pixels=MAX_PIXELS, profile=self.backend.limits,
                            loras=tuple(sorted(self.components.loras)))

    def plan(self, cfg: StreamConfig) -> Plan:
        ensure_valid(cfg, self.limits)
        return make_plan(cfg, self.components, self.prompts)

    @torch.inference_mode()
    def generate_unit(self, cfg: StreamConfig, image: np.ndarray | None = None) -> torch.Tensor:
        """The decoded image as (H, W, 3) float32 in [0, 1] (what parity tests compare)."""
        plan = self.plan(cfg)
        check_input(cfg, image)
        c = self.components
        t = plan.angles[:1]
        if cfg.mode == "img2img":
            clean = encode_clean(self.backend, c, imgs.to_tensor([image], c.device))
            x = sampler.entry_latent(t, plan.noise[:1], c.sigma_data, clean)
        else:
            x = sampler.entry_latent(t, plan.noise[:1], c.sigma_data)
        x0 = x
        for k in range(plan.steps):
            tk = plan.angles[k : k + 1]
            x0 = predict_x0(self.backend, c, x, tk, plan.embeds, plan.mask, plan.guidance, plan.loras)
            if k + 1 < plan.steps:
                x = sampler.renoise(x0, plan.angles[k + 1 : k + 2], plan.noise[k + 1 : k + 2], c.sigma_data)
        out = imgs.to_unit(decode_clean(self.backend, c, x0))[0]
        if not torch.isfinite(out).all():
            raise GenerationError("the model produced non-finite values (NaN/inf)")
        return out

    def generate(self, cfg: StreamConfig, image: np.ndarray | None = None) -> np.ndarray:
        """The decoded image as uint8 (H, W, 3)."""
        return imgs.to_uint8(self.generate_unit(cfg, image))
