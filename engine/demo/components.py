"""The demo model's untrained parts (autoencoder, transformer, text encoder, tokenizer) and caption encoding."""

from __future__ import annotations

from typing import Any

import torch
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.config import SIGMA_D, TEXT_HIDDEN, TRAIN_TOKENS, TrainConfig


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


def tokenize(tokenizer, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer([c.lower().strip() for c in captions], padding="max_length", max_length=TRAIN_TOKENS,
                    truncation=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def encode_text(text_encoder, tokenizer, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokenize(tokenizer, captions, device)
    return text_encoder(ids, attention_mask=mask).last_hidden_state, mask
