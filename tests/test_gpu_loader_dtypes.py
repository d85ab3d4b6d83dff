"""Which dtype each network gets under ``--dtype``: fp16 is the transformer's only (runs on CPU).

DC-AE (fp32) and the Gemma-2 text encoder (bf16, as diffusers' SANA pipelines keep it) overflow in
fp16; the prompt embeddings still reach the transformer in its dtype.
"""

from __future__ import annotations

import torch
from ditstream.engine.config import ModelConfig
from ditstream.engine.loader import component_dtypes, load_components


def test_fp16_keeps_the_vae_in_fp32_and_the_text_encoder_in_bf16():
    assert component_dtypes(torch.float16) == (torch.float32, torch.bfloat16)
    assert component_dtypes(torch.bfloat16) == (torch.bfloat16, torch.bfloat16)
    assert component_dtypes(torch.float32) == (torch.float32, torch.float32)


def test_tiny_model_under_fp16_loads_each_network_in_its_dtype(tiny_model_dir):
    from ditstream.engine.prompt_cache import PromptCache

    c = load_components(ModelConfig(model=str(tiny_model_dir), device="cpu", dtype="fp16"))
    assert c.dtype == torch.float16
    assert next(c.transformer.parameters()).dtype == torch.float16
    assert next(c.vae.parameters()).dtype == torch.float32
    assert {p.dtype for p in c.text_encoder.parameters()} == {torch.bfloat16}
    embeds, _ = PromptCache(c).get("a red fox")
    assert embeds.dtype == torch.float16 and torch.isfinite(embeds).all()  # cast for the transformer
