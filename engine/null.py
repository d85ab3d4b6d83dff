"""The null model: the real engine with no network, for measuring server overhead and for server tests.

``null_runner`` builds the ordinary ``EngineRunner`` around the ordinary ``EngineCore``; only the
model is null. Its parts are stand-ins with the few settings the core and sampler read: images are
their own latents (VAE scale factor 1, three channels, scaling 1), frames draw no noise
(``ModelComponents.draws_noise``), prompts embed to one zero token, and the ``null`` backend
(``engine.backends.null_backend``) predicts the clean latent exactly. So an img2img output is the
input image itself and a txt2img output is a flat grey frame, while everything else (inbox, plans,
batching policy, grouping into calls of at most ``max_batch``, similarity filter, failure handling,
counters) is the code a real model runs. Each denoise call sleeps ``delay_s``: the inference time a
real model would take. The core's float conversions and sampler arithmetic do run, on the CPU, for
every pixel (about 15 ms of CPU per 512² frame on a small VM, 0.3 ms at 64²), and count as
inference in each output's timings (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from ditstream.engine.backends.null_backend import NullBackend
from ditstream.engine.config import EngineConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.loader import ModelComponents
from ditstream.engine.runner import EngineRunner

#: Stream sizes must be multiples of this (the null transformer's declared patch; latents are pixels).
NULL_SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class _Part:
    """A stand-in network: the ``config`` settings the engine reads, and its dtype."""

    config: Any
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class _TransformerConfig:
    in_channels: int = 3
    patch_size: int = NULL_SIZE_MULTIPLE
    guidance_embeds_scale: float = 1.0


@dataclass(frozen=True)
class _VaeConfig:
    scaling_factor: float = 1.0
    #: One stage: a VAE scale factor of 2 ** 0 = 1 (latents are pixels).
    encoder_block_out_channels: tuple[int, ...] = (3,)


@dataclass(frozen=True)
class _SchedulerConfig:
    sigma_data: float = 0.5


class NullPrompts:
    """Prompt embeddings of the null model: one zero token for every prompt (nothing reads them)."""

    def __init__(self) -> None:
        self._value = (torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.long))

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._value


def null_components() -> ModelComponents:
    """The null model's parts (CPU, fp32, no weights, no defaults: the server picks a size)."""
    return ModelComponents(
        transformer=_Part(_TransformerConfig()), vae=_Part(_VaeConfig()), text_encoder=None, tokenizer=None,
        scheduler=_Part(_SchedulerConfig()), device=torch.device("cpu"), dtype=torch.float32, source="null",
        complex_human_instruction=None, defaults={}, draws_noise=False,
    )


def null_runner(config: EngineConfig | None = None, *, delay_s: float = 0.0) -> EngineRunner:
    """A runner (not started) of the real core on the null model; ``delay_s`` per denoise call."""
    components = null_components()
    backend = NullBackend(components, delay_s=delay_s)
    runner = EngineRunner(EngineCore(components, backend, NullPrompts(), config))
    runner.info = {"model": "null", "backend": backend.name, "device": "cpu", "dtype": "uint8",
                   "size_multiple": runner.core.size_multiple, "defaults": {}}
    return runner
