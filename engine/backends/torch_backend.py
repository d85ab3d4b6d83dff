"""Eager PyTorch backend: the reference every other backend is compared with."""

from __future__ import annotations

import torch
from ditstream.engine.backends.base import Backend


class TorchBackend(Backend):
    name = "torch"
    supports_loras = True

    def set_loras(self, loras):
        from ditstream.engine.lora import activate

        activate(self.components.transformer, loras)

    def temporal_attention(self):
        """Eager torch runs the transformer's own modules: the memory processor goes on them (first use)."""
        from ditstream.engine.temporal import TemporalAttention

        return TemporalAttention.for_transformer(self.components.transformer)

    @torch.inference_mode()
    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        transformer = self.components.transformer
        return transformer(
            x.to(self.dtype),
            encoder_hidden_states=encoder_hidden_states.to(self.dtype),
            encoder_attention_mask=encoder_attention_mask,
            guidance=guidance,
            timestep=timestep,
            return_dict=False,
        )[0]

    @torch.inference_mode()
    def encode(self, images):
        vae = self.components.vae
        return vae.encode(images.to(vae.dtype)).latent

    @torch.inference_mode()
    def decode(self, latents):
        vae = self.components.vae
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
