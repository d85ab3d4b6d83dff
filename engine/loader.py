"""Load a SANA-Sprint-format pipeline (diffusers layout) into ``ModelComponents``.

The model classes are diffusers'/transformers' own; this module owns only where the files come
from, dtype/device placement, and clear errors for missing or partial folders. The built-in demo
model ships inside the package and loads through exactly the same path.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ditstream.engine.config import ModelConfig
from ditstream.engine.errors import ModelLoadError
from ditstream.engine.sampler import DEFAULT_INTERMEDIATE

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo"
REQUIRED_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
#: Files a subfolder must hold (any one of each tuple).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"),
    "scheduler": ("scheduler_config.json",),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: What a model gets for every setting its ``ditstream.json`` ``defaults`` does not state (a real
#: SANA-Sprint folder usually has no ``ditstream.json``): SANA-Sprint's native 1024² and guidance
#: 4.5, one step (real time; SANA-Sprint's pipeline defaults to 2), the engine's img2img strength,
#: and a generic prompt.
FALLBACK_DEFAULTS: dict[str, Any] = {
    "prompt": "a watercolor painting, vivid colors",
    "width": 1024,
    "height": 1024,
    "steps": 1,
    "strength": 0.6,
    "guidance_scale": 4.5,
}
#: ``defaults`` keys and their types (``ditstream.json`` may state any subset).
DEFAULT_TYPES: dict[str, type | tuple[type, ...]] = {
    "prompt": str, "width": int, "height": int, "steps": int, "strength": (int, float),
    "guidance_scale": (int, float), "seed": int,
}


@dataclass
class ModelComponents:
    """The loaded networks and settings of one pipeline."""

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    source: str
    #: ``None`` = no instruction prefix; else the list of lines diffusers prepends to prompts.
    complex_human_instruction: list[str] | None = None
    #: The settings the model was made for (prompt, size, steps, strength, guidance): its
    #: ``ditstream.json`` ``defaults``, completed from ``FALLBACK_DEFAULTS`` (see ``model_defaults``).
    defaults: dict[str, Any] | None = None
    max_sequence_length: int = 300
    #: Second angle of two-step txt2img (``ditstream.json`` ``intermediate_angle``; SANA-Sprint's 1.3
    #: when absent). A model distilled differently may resolve its second step better elsewhere.
    intermediate_angle: float = DEFAULT_INTERMEDIATE
    #: LoRA adapters loaded on the transformer: name → the scale a stream gets unless it picks one.
    loras: dict[str, float] = field(default_factory=dict)
    #: Whether frames are noised at all: a diffusion model's are; the null model (``engine.null``) has
    #: nothing to denoise, so its plans hold zero noise and its outputs echo its inputs.
    draws_noise: bool = True

    @property
    def sigma_data(self) -> float:
        return float(self.scheduler.config.sigma_data)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def guidance_embeds_scale(self) -> float:
        return float(getattr(self.transformer.config, "guidance_embeds_scale", 1.0))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, fp32, bf16 or fp16")
    return table[name]


def component_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """``(vae, text encoder)`` dtypes for a transformer in ``dtype``: neither ever runs in fp16.

    DC-AE overflows in fp16 (ANCHORS.md): fp32 instead. Gemma-2's activations overflow fp16 too, and
    diffusers' SANA pipelines keep the text encoder in bf16 under an fp16 transformer; the prompt
    cache casts its embeddings to the transformer's dtype.
    """
    if dtype == torch.float16:
        return torch.float32, torch.bfloat16
    return dtype, dtype


def resolve_source(model: str) -> str | Path:
    """``demo`` → the packaged folder; an existing path → that folder; else treat as a hub id."""
    if model == "demo":
        return DEMO_MODEL_DIR
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return path
    return model


def check_folder(path: Path) -> None:
    """Raise ``ModelLoadError`` listing every missing part of a diffusers-layout folder."""
    if not path.is_dir():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist")
    problems: list[str] = []
    if not (path / "model_index.json").is_file():
        problems.append("model_index.json")
    for sub in REQUIRED_SUBFOLDERS:
        folder = path / sub
        if not folder.is_dir():
            problems.append(f"{sub}/")
            continue
        if not any((folder / f).is_file() for f in REQUIRED_FILES[sub]):
            problems.append(f"{sub}/{' or '.join(REQUIRED_FILES[sub])}")
        if sub in ("transformer", "vae", "text_encoder") and not any(
            p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in folder.iterdir()
        ):
            problems.append(f"{sub}/ weights (*.safetensors)")
    if problems:
        raise ModelLoadError(
            f"model folder {str(path)!r} is not a complete SANA-Sprint pipeline; missing: {', '.join(problems)}"
        )


def load_components(config: ModelConfig) -> ModelComponents:
    """Load transformer, VAE, text encoder, tokenizer and scheduler for ``config.model``."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel, SCMScheduler
    from transformers import AutoModel, AutoTokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_source(config.model)
    if isinstance(source, Path):
        check_folder(source)
    kwargs: dict[str, Any] = {"local_files_only": config.local_files_only} if not isinstance(source, Path) else {}
    src = str(source)
    try:
        transformer = SanaTransformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype, **kwargs)
        vae_dtype, text_dtype = component_dtypes(dtype)
        vae = AutoencoderDC.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **kwargs)
        text_encoder = AutoModel.from_pretrained(src, subfolder="text_encoder", dtype=text_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kwargs)
        scheduler = SCMScheduler.from_pretrained(src, subfolder="scheduler", **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {config.model!r}: {exc}") from exc

    transformer.to(device=device).eval()
    vae.to(device=device).eval()
    text_encoder.to(device=device).eval()
    for module in (transformer, vae, text_encoder):
        module.requires_grad_(False)

    loras = {}
    if config.loras:
        from ditstream.engine.lora import load_loras

        loras = load_loras(transformer, config.loras)
    extra = read_extra(source)
    chi = _instruction(config.complex_human_instruction, extra)
    stated = stated_defaults(config.model, extra)
    logger.info("loaded model %s on %s (%s)", config.model, device, dtype)
    return ModelComponents(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=scheduler, device=device, dtype=dtype, source=src,
        complex_human_instruction=chi, defaults=model_defaults(stated),
        max_sequence_length=int(config.max_sequence_length or extra.get("max_sequence_length") or 300),
        intermediate_angle=_intermediate_angle(config.model, extra), loras=loras,
    )


def read_extra(source: str | Path) -> dict[str, Any]:
    """Optional ``ditstream.json`` beside ``model_index.json`` (prompt instruction, defaults)."""
    if isinstance(source, Path) and (source / "ditstream.json").is_file():
        return json.loads((source / "ditstream.json").read_text())
    return {}


def stated_defaults(model: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``defaults`` of ``ditstream.json`` (``{}`` when absent), each checked for its type."""
    stated = extra.get("defaults") or {}
    if not isinstance(stated, dict):
        raise ModelLoadError(f"model {model!r}: ditstream.json defaults must be an object, got {stated!r}")
    for key, value in stated.items():
        want = DEFAULT_TYPES.get(key)
        if want is None:
            raise ModelLoadError(f"model {model!r}: ditstream.json defaults has an unknown key {key!r}; "
                                 f"known: {', '.join(DEFAULT_TYPES)}")
        if isinstance(value, bool) or not isinstance(value, want):
            raise ModelLoadError(f"model {model!r}: ditstream.json defaults.{key} has the wrong type: {value!r}")
    return dict(stated)


def model_defaults(stated: dict[str, Any] | None) -> dict[str, Any]:
    """A model's full defaults: what its ``ditstream.json`` states over ``FALLBACK_DEFAULTS``."""
    return {**FALLBACK_DEFAULTS, **(stated or {})}


def _intermediate_angle(model: str, extra: dict[str, Any]) -> float:
    value = extra.get("intermediate_angle", DEFAULT_INTERMEDIATE)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < math.pi / 2:
        raise ModelLoadError(f"model {model!r}: ditstream.json intermediate_angle must be an angle in "
                             f"(0, π/2), got {value!r}")
    return float(value)


def _instruction(flag: bool | None, extra: dict[str, Any]) -> list[str] | None:
    from ditstream.engine.prompt_cache import default_complex_human_instruction

    if flag is False:
        return None
    if flag is True:
        return default_complex_human_instruction()
    if extra.get("complex_human_instruction") is False:
        return None
    return extra.get("complex_human_instruction") or default_complex_human_instruction()
