"""``ditstream train-demo``: reproduce the demo model from scratch (autoencoder → teacher → one step).

Recipe (all seeded, see ``docs/demo_model_card.md``):

1. **Autoencoder.** A 4-level ``AutoencoderDC`` (f8, 16 latent channels) around a *designed* latent
   (``designed_latent``: per cell the shape class, colours and coverage): the encoder regresses it
   from pixels, the decoder draws from it; ``scaling_factor`` is 1/std of the designed latents. The
   teacher and the student learn from the exact designed latents of the training images. A second
   stage fine-tunes the decoder to draw crisp shapes from blurred latents too, as a one-step student
   makes them (``train_decoder_for_one_step``).
2. **Teacher.** A ``SanaTransformer2DModel`` trained as a TrigFlow flow model over t ∈ (0, π/2] with
   the exact SANA-Sprint parametrisation (σd = 0.5), jointly with a 2-layer ``Gemma2Model`` text
   encoder; 10 % caption dropout so that it can be sampled with classifier-free guidance.
3. **Distillation.** Reflow pairs along the teacher's ODE: by default real training images are carried
   to noise by the teacher's ODE run backwards (second-order DDIM in TrigFlow angles), so each
   trajectory ends on a real, correctly drawn image (``pairs_from="teacher"``: noise → teacher sample
   with CFG instead). The one-step student (initialised from the teacher) regresses the trajectory's
   end point from any point on it (trajectory/consistency distillation). At img2img entry angles it
   also learns from procedurally paired edits — the same geometry rendered with the prompt's colours —
   so that one-step img2img keeps the input's position while taking the prompt's colour, and from
   its own one-step output re-noised to an intermediate angle (what the second of two steps sees).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.components import build_components, encode_text
from ditstream.engine.demo.config import SERVE_TOKENS, TrainConfig
from ditstream.engine.demo.latents import clean_latents
from ditstream.engine.demo.probes import log_decoder, probe_teacher
from ditstream.engine.demo.train import (
    resolve_device,
    train_autoencoder,
    train_decoder_for_one_step,
    train_student,
    train_teacher,
)
from ditstream.engine.demo.trigflow import invert_pairs, make_pairs

logger = logging.getLogger(__name__)


def train_demo(out: str | Path, cfg: TrainConfig | None = None, *, default_strength: float = 0.5,
               workdir: str | Path | None = None, lora_steps: int | None = None) -> Path:
    """Run the whole recipe and save a diffusers-layout folder at ``out``, then train the demo LoRA
    (``engine.demo.lora``; ``lora_steps`` 0 skips it, ``None`` is its default) into ``out/loras``.

    With ``workdir``, each finished stage leaves a checkpoint there and a rerun with the same
    config resumes after the last finished stage (a 45-minute CPU run should not restart from zero).
    """
    from ditstream.engine.synthetic import save_pipeline

    run = _Run.start(cfg or TrainConfig(), workdir)
    cfg, device = run.cfg, run.device
    t0 = time.time()
    comps = build_components(cfg)
    vae, transformer, text_encoder, tokenizer = (comps["vae"].to(device), comps["transformer"].to(device),
                                                 comps["text_encoder"].to(device), comps["tokenizer"])
    logger.info("generating %d procedural images", cfg.n_images)
    images, specs = ds.make_dataset(cfg.n_images, seed=cfg.seed)
    captions = [s.caption for s in specs]
    # 1. autoencoder → 2. decoder tuned for one-step outputs → 3. flow teacher → 4. one-step student
    scale = run.autoencoder(vae, images, specs)
    latents = clean_latents(specs, cfg, scale, device)
    if cfg.eval_every:
        log_decoder(vae, scale, cfg, device, "autoencoder")
    t_ae = time.time()
    run.decoder(vae, images, specs, scale)
    t_decoder = time.time()
    teacher = run.teacher(transformer, text_encoder, tokenizer, vae, scale, latents, captions)
    t_teacher = time.time()
    student = run.student(teacher, text_encoder, tokenizer, vae, scale, latents, captions)
    t_end = time.time()

    comps.update(transformer=student.cpu(), vae=vae.cpu(), text_encoder=text_encoder.cpu())
    timings = {"autoencoder_s": round(t_ae - t0), "decoder_s": round(t_decoder - t_ae),
               "teacher_s": round(t_teacher - t_decoder),
               "distillation_s": round(t_end - t_teacher), "total_s": round(t_end - t0),
               "device": str(device), "resumed": run.resumed}
    path = save_pipeline(comps, out, extra=_model_card(cfg, timings, default_strength))
    logger.info("saved demo model to %s (%s)", path, timings)
    if lora_steps != 0:
        from ditstream.engine.demo.lora import LoraTrainConfig, train_swap_lora

        lcfg = LoraTrainConfig(seed=cfg.seed, threads=cfg.threads)
        train_swap_lora(path, Path(path) / "loras", replace(lcfg, steps=lora_steps) if lora_steps else lcfg)
    return path


@dataclass
class _Run:
    """What the stages of one training run share: the config, the device, the two random streams (numpy
    for data, torch for noise; both checkpointed, so a resumed run draws what an unbroken one would)
    and the checkpoint folder with the stages resumed from it."""

    cfg: TrainConfig
    device: torch.device
    rng: np.random.Generator
    gen: torch.Generator
    ckpt: Path | None
    resumed: list[str] = field(default_factory=list)  # stages loaded from ``ckpt``: not in this run's timings

    @classmethod
    def start(cls, cfg: TrainConfig, workdir: str | Path | None) -> _Run:
        device = resolve_device(cfg.device)
        if device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        ckpt = Path(workdir) if workdir is not None else None
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)
        return cls(cfg, device, rng, gen, ckpt)

    def _saved(self, name: str) -> Path | None:
        """The checkpoint of stage ``name`` when a previous run left one."""
        path = self.ckpt / name if self.ckpt is not None else None
        return path if path is not None and path.is_file() else None

    def autoencoder(self, vae: Any, images: Any, specs: list) -> float:
        """Train (or resume) the autoencoder; returns the latent scaling factor, set on ``vae`` frozen."""
        cfg, device, rng = self.cfg, self.device, self.rng
        if (saved := self._saved("autoencoder.pt")) is not None:
            state = torch.load(saved, map_location=device)
            vae.load_state_dict(state["vae"])
            scale = state["scale"]
            rng.bit_generator.state = state["rng"]
            self.resumed.append("autoencoder")
            logger.info("resumed autoencoder from %s", self.ckpt)
        else:
            scale = train_autoencoder(vae, images, specs, cfg, device, rng)
            if self.ckpt is not None:
                torch.save({"vae": vae.state_dict(), "scale": scale, "rng": rng.bit_generator.state},
                           self.ckpt / "autoencoder.pt")
        vae.eval()
        vae.register_to_config(scaling_factor=scale)
        vae.requires_grad_(False)
        return scale

    def decoder(self, vae: Any, images: Any, specs: list, scale: float) -> None:
        """Tune (or resume) the decoder for one-step outputs (``decoder_steps`` 0 skips it)."""
        cfg, device = self.cfg, self.device
        if not cfg.decoder_steps:
            return
        if (saved := self._saved("decoder.pt")) is not None:
            vae.decoder.load_state_dict(torch.load(saved, map_location=device))
            self.resumed.append("decoder")
            logger.info("resumed decoder from %s", self.ckpt)
            return
        train_decoder_for_one_step(vae, images, specs, cfg, device)
        vae.requires_grad_(False)
        if self.ckpt is not None:
            torch.save(vae.decoder.state_dict(), self.ckpt / "decoder.pt")
        if cfg.eval_every:
            log_decoder(vae, scale, cfg, device, "decoder for one step")

    def teacher(self, transformer: Any, text_encoder: Any, tokenizer: Any, vae: Any, scale: float,
                latents: torch.Tensor, captions: list[str]) -> Any:
        """Train (or resume) the flow teacher (and the text encoder with it); returns it frozen."""
        cfg, device, rng, gen = self.cfg, self.device, self.rng, self.gen
        if (saved := self._saved("teacher.pt")) is not None:
            state = torch.load(saved, map_location=device)
            transformer.load_state_dict(state["teacher"])
            text_encoder.load_state_dict(state["text_encoder"])
            text_encoder.eval().requires_grad_(False)
            teacher = transformer.eval().requires_grad_(False)
            rng.bit_generator.state = state["rng"]
            gen.set_state(state["gen"])
            self.resumed.append("teacher")
            logger.info("resumed teacher from %s", self.ckpt)
            return teacher

        def probe(ema: Any, step: int) -> None:
            logger.info("teacher step %d: %s", step, probe_teacher(ema, text_encoder, tokenizer, vae, scale, cfg, device))

        teacher = train_teacher(transformer, text_encoder, tokenizer, latents, captions, cfg, device, gen, rng,
                                probe=probe)
        if self.ckpt is not None:
            torch.save({"teacher": teacher.state_dict(), "text_encoder": text_encoder.state_dict(),
                        "rng": rng.bit_generator.state, "gen": gen.get_state()}, self.ckpt / "teacher.pt")
        return teacher

    def student(self, teacher: Any, text_encoder: Any, tokenizer: Any, vae: Any, scale: float,
                latents: torch.Tensor, captions: list[str]) -> Any:
        """Distil the one-step student from (noise, image) pairs the teacher makes (``pairs_from``)."""
        cfg, device, rng, gen = self.cfg, self.device, self.rng, self.gen
        if cfg.pairs_from == "inversion":
            pairs = invert_pairs(teacher, text_encoder, tokenizer, latents, captions, cfg, device, rng)
        elif cfg.pairs_from == "teacher":
            pairs = make_pairs(teacher, text_encoder, tokenizer, cfg, device, gen)
        else:
            raise ValueError(f"pairs_from must be 'inversion' or 'teacher', got {cfg.pairs_from!r}")
        cap_table = {}
        with torch.no_grad():
            for c in ds.all_captions():
                text = ds.caption_for(*c)
                cap_table[text] = encode_text(text_encoder, tokenizer, [text], device)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        return train_student(student, pairs, vae, scale, cap_table, cfg, device, gen, rng)


def _model_card(cfg: TrainConfig, timings: dict[str, Any], default_strength: float) -> dict[str, Any]:
    """What the saved model's ``ditstream.json`` says: how to serve it and how it was trained."""
    return {"complex_human_instruction": False, "intermediate_angle": cfg.intermediate_angle,
            "max_sequence_length": SERVE_TOKENS,
            # The prompt a new user sees first (page, clients): the best-drawn class (circles are
            # 100 % in the model card) in a colour far from the page's red test pattern.
            "defaults": {"prompt": ds.caption_for("circle", "blue", "white"),
                         "width": 64, "height": 64, "steps": 1, "strength": default_strength,
                         "guidance_scale": cfg.cfg_scale},
            "training": {"config": _jsonable(asdict(cfg)), "timings": timings}}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
