"""Real-class SANA-Sprint pipelines with random weights, built offline.

Tests and benchmarks need models without a download. These are the diffusers classes
(``SanaTransformer2DModel``, ``AutoencoderDC``, ``Gemma2Model``, ``SCMScheduler``) at small sizes,
saved in diffusers layout so that they load back through ``engine.loader`` exactly like a real
SANA-Sprint folder. ``tiny`` is diffusers' own test configuration; ``small``/``medium`` are large
enough for batching to matter in ``ditstream bench``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' own test configuration (ANCHORS.md): 4 latent channels, VAE scale factor 2.
    "tiny": dict(
        transformer=dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                         attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                         cross_attention_dim=8, caption_channels=8, sample_size=32),
        vae=dict(latent_channels=4, attention_head_dim=2, block_out_channels=(8, 8),
                 block_types=("ResBlock", "EfficientViTBlock"), qkv_multiscales=((), (5,)),
                 layers_per_block=(1, 1)),
        text=dict(hidden_size=8, head_dim=16, intermediate_size=64, num_attention_heads=2,
                  num_hidden_layers=1, num_key_value_heads=2),
    ),
    # ``tiny`` with a 32× DC-AE (six stages), the factor of the real model and of TAESANA: the smallest
    # model a tiny autoencoder (``engine/tiny_vae.py``, ``--tiny-vae``) fits.
    "tiny-f32": dict(
        transformer=dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                         attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                         cross_attention_dim=8, caption_channels=8, sample_size=32),
        vae=dict(latent_channels=4, attention_head_dim=2, block_out_channels=(8,) * 6,
                 block_types=("ResBlock",) * 5 + ("EfficientViTBlock",), qkv_multiscales=((),) * 5 + ((5,),),
                 layers_per_block=(1,) * 6),
        text=dict(hidden_size=8, head_dim=16, intermediate_size=64, num_attention_heads=2,
                  num_hidden_layers=1, num_key_value_heads=2),
    ),
    # ~0.3M-parameter transformer on 8×8 latents (64×64 px, f8): the size class of the demo model, where
    # a CPU is still overhead-bound so batching pays, as a GPU is for the real model.
    "small": dict(
        transformer=dict(patch_size=1, in_channels=8, out_channels=8, num_layers=4, num_attention_heads=2,
                         attention_head_dim=32, num_cross_attention_heads=2, cross_attention_head_dim=32,
                         cross_attention_dim=64, caption_channels=64, sample_size=32),
        vae=dict(latent_channels=8, attention_head_dim=8, block_out_channels=(8, 16, 32, 32),
                 block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
                 qkv_multiscales=((), (), (), (5,)), layers_per_block=(1, 1, 1, 1)),
        text=dict(hidden_size=64, head_dim=16, intermediate_size=128, num_attention_heads=4,
                  num_hidden_layers=1, num_key_value_heads=4),
    ),
    # Big enough that one batched call is clearly cheaper than several small ones on a CPU.
    "medium": dict(
        transformer=dict(patch_size=1, in_channels=16, out_channels=16, num_layers=6, num_attention_heads=8,
                         attention_head_dim=32, num_cross_attention_heads=8, cross_attention_head_dim=32,
                         cross_attention_dim=256, caption_channels=64, sample_size=32),
        vae=dict(latent_channels=16, attention_head_dim=8, block_out_channels=(16, 32, 64),
                 block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), qkv_multiscales=((), (), (5,)),
                 layers_per_block=(1, 1, 1)),
        text=dict(hidden_size=64, head_dim=16, intermediate_size=128, num_attention_heads=4,
                  num_hidden_layers=1, num_key_value_heads=4),
    ),
}

VOCAB_WORDS = (
    "a an the on of in with and red green blue yellow white black orange purple pink cyan gray "
    "circle square triangle star ring background cat dog astronaut horse photo painting"
).split()


def make_tokenizer(words: list[str] | tuple[str, ...] = VOCAB_WORDS):
    """A word-level tokenizer wrapped as a transformers fast tokenizer (no hub access)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
    )


def build_components(preset: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Instantiate the five components of a SANA-Sprint pipeline with seeded random weights."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model

    cfg = PRESETS[preset]
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        **cfg["transformer"], qk_norm="rms_norm_across_heads", guidance_embeds=True,
    )
    v = cfg["vae"]
    vae = AutoencoderDC(
        in_channels=3, latent_channels=v["latent_channels"], attention_head_dim=v["attention_head_dim"],
        encoder_block_types=v["block_types"], decoder_block_types=v["block_types"],
        encoder_block_out_channels=v["block_out_channels"], decoder_block_out_channels=v["block_out_channels"],
        encoder_qkv_multiscales=v["qkv_multiscales"], decoder_qkv_multiscales=v["qkv_multiscales"],
        encoder_layers_per_block=v["layers_per_block"], decoder_layers_per_block=v["layers_per_block"],
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    text_cfg = Gemma2Config(**cfg["text"], vocab_size=len(tokenizer))
    text_encoder = Gemma2Model(text_cfg)
    scheduler = SCMScheduler()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def save_pipeline(components: dict[str, Any], path: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Save in diffusers layout (``model_index.json`` + one subfolder per component)."""
    from diffusers import SanaSprintPipeline

    path = Path(path)
    pipe = SanaSprintPipeline(**components)
    pipe.save_pretrained(path, safe_serialization=True)
    if extra is not None:
        (path / "ditstream.json").write_text(json.dumps(extra, indent=2))
    return path


def make_pipeline_folder(path: str | Path, preset: str = "tiny", seed: int = 0, **extra: Any) -> Path:
    """Build and save a random-weight pipeline; ``extra`` goes to ``ditstream.json``."""
    return save_pipeline(build_components(preset, seed), path, extra=extra or {"complex_human_instruction": False})
