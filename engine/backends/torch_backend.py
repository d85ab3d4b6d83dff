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

    def __init__(self, components, options=None) -> None:
        from ditstream.engine.temporal import TemporalAttention

        super().__init__(components, options)
        # Eager torch runs the transformer's own modules, so attention memory (``temporal``) can go
        # on them: installed here, on the engine's side, once; without memory it is diffusers' own.
        self._temporal = TemporalAttention.for_transformer(components.transformer)

    def temporal_attention(self):
        return self._temporal

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
