"""The demo model's training configuration and the constants its parts share (σd, latent and text widths, token counts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ditstream.engine.demo import dataset as ds

SIGMA_D = 0.5


#: Channels of the designed latent (``designed_latent``): class ×5, shape colour ×3, background ×3,
#: coverage, coverage of the four quarter cells (16 also divides AutoencoderDC's 64-channel shortcut).
LATENT_CHANNELS = len(ds.SHAPES) + 3 + 3 + 1 + 4


TEXT_HIDDEN = 64


#: Tokens per caption in training: "<bos> a red circle on a blue background" is 8; padding is masked
#: and the encoder is causal, so the embeddings equal those of the 300-token inference path.
TRAIN_TOKENS = 8


#: Tokens the served model pads prompts to (``ditstream.json`` ``max_sequence_length``): room for
#: longer prompts than the captions, and a tenth of the cross-attention of the 300-token default
#: (padding is masked, so the images are the same).
SERVE_TOKENS = 32


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the recipe; the defaults reproduce the shipped weights."""

    seed: int = 0
    device: str = "auto"
    threads: int = 1
    n_images: int = 8000
    ae_steps: int = 6000
    ae_batch: int = 16
    ae_lr: float = 2e-3
    #: Steps of ``train_decoder_for_one_step`` after the autoencoder (0: skip; decoder as trained).
    decoder_steps: int = 3000
    decoder_lr: float = 1e-3
    #: Most blur, in passes of a 3×3 binomial filter over the latent grid (drawn per sample, uniform,
    #: fractional passes interpolated), that the decoder learns to draw crisp shapes through. A
    #: one-step student predicts something like the mean of what its noise may become: its coverage
    #: comes out rounder than any drawn shape (about 1–2 passes), and a decoder trained on crisp
    #: latents then draws the round outline it sees, not the class the class channels name (before
    #: this stage: class channels right for 280/280 captions, one-step shape 56 %; one pass of blur
    #: over exact latents took the shape read from 94 to 69 %).
    decoder_blur: float = 3.0
    #: Share of the decoder stage's latents left unblurred, so that exact latents (img2img, the
    #: second of two steps) stay as crisp as before (all blurred: 92.5 → 83.5 % on exact latents).
    decoder_crisp: float = 0.5
    teacher_steps: int = 5000
    teacher_batch: int = 64
    teacher_lr: float = 1e-3
    caption_dropout: float = 0.1
    pairs: int = 8000
    teacher_sample_steps: int = 12
    #: Where the one-step student's txt2img pairs come from. ``"inversion"``: real training images
    #: carried to noise by the teacher's own ODE (DDIM run backwards), so every pair (noise → image)
    #: follows the teacher's flow but ends on a real, correctly shaped image. ``"teacher"``: classic
    #: reflow pairs, noise → teacher sample (the student then inherits the teacher's blobby shapes).
    pairs_from: str = "inversion"
    cfg_scale: float = 3.0
    student_steps: int = 2500
    student_batch: int = 32
    student_lr: float = 3e-4
    #: Share of the student's txt2img samples that are its own one-step prediction re-noised to an
    #: angle in ``second_step_angles`` (what the second of two steps sees), instead of teacher ODE
    #: states (which serving never feeds it).
    second_step_share: float = 0.25
    second_step_angles: tuple[float, float] = (0.3, 1.3)
    ema: float = 0.999
    transformer: dict[str, Any] = field(default_factory=lambda: dict(
        hidden=64, layers=4, heads=4))
    vae_channels: tuple[int, ...] = (8, 16, 32, 64)
    latent_channels: int = LATENT_CHANNELS
    #: Transformer patch size over the latent grid (2 on an f4 latent = the token grid of f8 at patch 1).
    patch_size: int = 1
    #: Teacher samples scored by the evaluator every this many steps (0: never); logged, not used.
    eval_every: int = 500
    image_size: int = 64
    #: Second angle of two-step txt2img, written to ``ditstream.json`` (SANA-Sprint's weights use 1.3).
    #: Chosen by a sweep of the shipped weights (model card): 0.7 / 0.9 / 1.1 / 1.3 give colour
    #: 96.4 / 98.2 / 99.6 / 99.3 % and shape 84.6 / 87.5 / 88.9 / 85.4 % (one step: 99.3 / 76.1 %).
    intermediate_angle: float = 1.1

    @property
    def latent_size(self) -> int:
        """Side of the latent grid: the image side over the autoencoder's 2^(levels−1) downsampling."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    @property
    def cell(self) -> int:
        """Pixels per latent cell along a side (8 for the shipped 64×64 model)."""
        return self.image_size // self.latent_size
