"""Prompt-embedding LRU cache: the text encoder runs once per prompt, never per frame."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ditstream.engine.loader import ModelComponents


def default_complex_human_instruction() -> list[str]:
    """diffusers' default instruction prefix for SANA-Sprint (read from its signature, not copied)."""
    import inspect

    from diffusers import SanaSprintPipeline

    return list(inspect.signature(SanaSprintPipeline.__call__).parameters["complex_human_instruction"].default)


class PromptSource(Protocol):
    """Where plans get prompt embeddings: ``PromptCache`` for a model, ``engine.null.NullPrompts`` for none."""

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds (1, L, D), mask (1, L))`` of ``prompt``."""
        ...


class PromptCache:
    """LRU of ``prompt -> (embeds (1, L, D), mask (1, L))``.

    Encoding goes through diffusers' ``SanaSprintPipeline.encode_prompt`` so embeddings equal the
    reference pipeline's. Thread-safe; the encoder runs outside the lock only for misses.
    """

    def __init__(self, components: ModelComponents, max_size: int = 256, max_sequence_length: int | None = None) -> None:
        from diffusers import SanaSprintPipeline

        self.components = components
        self.max_size = max_size
        self.max_sequence_length = max_sequence_length or components.max_sequence_length
        self._pipe = SanaSprintPipeline(
            tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
            transformer=components.transformer, scheduler=components.scheduler,
        )
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                self.hits += 1
                return self._cache[prompt]
        value = self._encode(prompt)
        with self._lock:
            self.misses += 1
            self._cache[prompt] = value
            self._cache.move_to_end(prompt)
            while len(self._cache) > self.max_size:
                self._cache.popitem(last=False)
        return value

    @torch.inference_mode()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self._pipe.encode_prompt(
            prompt,
            num_images_per_prompt=1,
            device=self.components.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.components.complex_human_instruction,
        )
        return embeds.to(self.components.dtype), mask


class BatchConditioning:
    """A denoise call's concatenated ``(embeds, mask, guidance)``, rebuilt only when its plans change.

    Streams keep their plan for many ticks, so a call of the same streams at the same stages asks for
    the same concatenation every tick; concatenating again would copy (B, L, D) embeddings on the
    device per call. Keyed by the identity of the call's plans, in order (plans are immutable, and an
    entry holds its plans, so an id is never reused while its entry lives); the ``max_entries`` most
    recent compositions are kept (several groups and chunks per tick), which bounds the device memory.
    Engine thread only.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[tuple, tuple[torch.Tensor, ...]]] = OrderedDict()
        #: Concatenations made (a test counts them: one per new composition, none per tick).
        self.builds = 0

    def get(self, plans: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeds (B, L, D), mask (B, L), guidance (B,))`` of ``plans`` (``engine.plan.Plan``), in order."""
        key = tuple(id(p) for p in plans)
        entry = self._entries.get(key)
        if entry is not None and all(a is b for a, b in zip(entry[0], plans, strict=True)):
            self._entries.move_to_end(key)
            return entry[1]  # type: ignore[return-value]
        value = (torch.cat([p.embeds for p in plans]), torch.cat([p.mask for p in plans]),
                 torch.cat([p.guidance for p in plans]))
        self.builds += 1
        self._entries[key] = (tuple(plans), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value
