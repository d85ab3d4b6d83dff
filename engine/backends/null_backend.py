"""The null backend: no network, a fixed cost per call, and outputs that echo the inputs.

It runs the null model (``engine.null``): images are their own latents (the VAE is the identity)
and the model draws no noise, so a latent at angle ``t`` is ``cos t · clean`` and the "transformer"
predicts ``x0 = x / cos t`` exactly. Through the real core and sampler that makes an img2img frame
come back as itself and a txt2img frame as flat grey (x0 = 0). ``delay_s`` is slept in every
denoise call: the inference time a real model would take, so benches and load tests see ticks of
a realistic length while the machine stays free for the server around the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from ditstream.engine.backends.base import Backend
from ditstream.engine.errors import BackendUnavailableError

if TYPE_CHECKING:
    from ditstream.engine.config import BackendOptions
    from ditstream.engine.loader import ModelComponents


class NullBackend(Backend):
    name = "null"

    def __init__(self, components: ModelComponents, options: BackendOptions | None = None, *, delay_s: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if components.draws_noise:  # x0 = x / cos t is exact only without noise: a real model's output would be noise
            raise BackendUnavailableError("the null backend runs only the null model (--model null)")
        super().__init__(components, options)
        #: Seconds each denoise call takes (the simulated model), spent by ``sleep`` (a test's fake clock).
        self.delay_s = delay_s
        self._sleep = sleep

    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        """The raw output that makes the sampler predict ``x0 = x / cos t`` (``sampler.denoised``).

        With ``s = sin t / (sin t + cos t)`` that output is ``-x_in / (1 - s)``. At ``t = π/2``
        (``s`` = 1: pure noise, i.e. txt2img or strength 1) nothing of the input is left; the output
        is then 0, so the sampler predicts ``x / (sin t + cos t)`` ≈ 0: the grey frame.
        """
        if self.delay_s:
            self._sleep(self.delay_s)
        gap = 1.0 - timestep.float().reshape(-1, *([1] * (x.dim() - 1)))
        scale = torch.where(gap > 1e-6, -1.0 / gap.clamp_min(1e-6), torch.zeros_like(gap))  # per sample
        return x * scale

    def encode(self, images):
        # Images arrive as a channels-last view (``images.to_tensor``); a real encoder returns dense
        # latents, and the sampler's broadcasts over a strided view run several times slower.
        return images.contiguous()

    def decode(self, latents):
        return latents
