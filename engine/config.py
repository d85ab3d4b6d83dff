"""Engine configuration as frozen data.

Constructors take these objects; nothing in ``engine`` reads the environment. ``StreamConfig`` is
validated once (``validate``) so that the hot loop can trust it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ditstream.engine.blend import MAX_BLEND, WeightedPrompt, WeightedSeed, blend_entries, check_weights
from ditstream.engine.errors import ValidationError

Mode = Literal["img2img", "txt2img"]
Interpolation = Literal["linear", "slerp"]
INTERPOLATIONS: tuple[str, ...] = ("linear", "slerp")
#: Longest glide between configs, in output frames.
MAX_TRANSITION_FRAMES = 1000
#: ``temporal_decay`` default: how fast the attention memory forgets (chosen in docs/demo_model_card.md).
DEFAULT_TEMPORAL_DECAY = 0.5

#: Latent/pixel sizes must be multiples of this (DC-AE downsamples 32×; the demo model 8×).
DEFAULT_SIZE_MULTIPLE = 32


#: File names looked for in a ``--tiny-vae`` folder (the published TAESANA names).
TINY_VAE_STEMS = {"encoder": "taesana_encoder", "decoder": "taesana_decoder"}
TINY_VAE_SUFFIXES = (".safetensors", ".pth", ".pt")


@dataclass(frozen=True)
class BackendOptions:
    """How a backend is built: its size/batch profile, where exports and engines are cached, and an
    optional tiny autoencoder. The same object serves ``build-engine``, ``serve``, ``worker``,
    ``generate`` and the benches, so what one builds the others find (``trt_build.specs``).

    ``resolutions`` are (width, height) and ``batches`` batch sizes; the first of each is the profile's
    opt and min/max bound it. Empty = the default profile (``trt_build.cache.DEFAULT_RESOLUTIONS`` and
    ``DEFAULT_BATCHES``) for ``tensorrt``, and no bound at all for the dynamic-shape backends.
    ``seq_len`` defaults to the model's ``max_sequence_length``; ``opt_level`` to TensorRT's level 3.
    ``cache_dir`` is the engine cache folder (default ``~/.cache/ditstream/engines``). ``tiny_vae`` is a
    TAESANA file or a folder holding ``taesana_encoder.*`` and/or ``taesana_decoder.*``.
    ``build_deadline`` (``time.monotonic()``) cancels TensorRT builds still running after it and stops
    a torch.compile warm-up before its next shape.
    """

    resolutions: tuple[tuple[int, int], ...] = ()
    batches: tuple[int, ...] = ()
    seq_len: int | None = None
    cache_dir: str | None = None
    tiny_vae: str | None = None
    opt_level: int | None = None
    build_deadline: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolutions", tuple((int(w), int(h)) for w, h in self.resolutions))
        object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))

    @property
    def has_profile(self) -> bool:
        """Whether sizes or batch sizes were asked for (else each backend keeps its default)."""
        return bool(self.resolutions or self.batches)

    def validate(self) -> BackendOptions:
        """Check every field without loading anything; raise ``ValidationError`` naming it."""
        for w, h in self.resolutions:
            if w <= 0 or h <= 0:
                raise ValidationError(f"resolution {w}x{h} must be positive", field="resolution")
        for b in self.batches:
            if not 1 <= b <= 1024:
                raise ValidationError(f"batch size must be in [1, 1024], got {b}", field="batch")
        if self.seq_len is not None and not 1 <= self.seq_len <= 4096:
            raise ValidationError(f"seq_len must be in [1, 4096], got {self.seq_len}", field="seq_len")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise ValidationError(f"opt_level must be in [0, 5], got {self.opt_level}", field="opt_level")
        if self.cache_dir is not None:
            path = Path(self.cache_dir).expanduser()
            if path.exists() and not path.is_dir():
                raise ValidationError(f"cache dir {self.cache_dir!r} exists and is not a folder", field="cache_dir")
        self.tiny_vae_files()
        return self

    def tiny_vae_files(self) -> tuple[Path | None, Path | None]:
        """(encoder, decoder) weight files of ``tiny_vae`` (either may be ``None``; both when unset).

        A file counts as the decoder unless its name says ``encoder``; a folder is searched for the
        TAESANA names. Raises ``ValidationError`` when the path holds neither.
        """
        if self.tiny_vae is None:
            return None, None
        path = Path(self.tiny_vae).expanduser()
        if path.is_file():
            return (path, None) if "encoder" in path.name.lower() else (None, path)
        if path.is_dir():
            found = {side: next((path / f"{stem}{suf}" for suf in TINY_VAE_SUFFIXES
                                 if (path / f"{stem}{suf}").is_file()), None)
                     for side, stem in TINY_VAE_STEMS.items()}
            if found["encoder"] is None and found["decoder"] is None:
                names = ", ".join(f"{stem}{TINY_VAE_SUFFIXES[0]}" for stem in TINY_VAE_STEMS.values())
                raise ValidationError(f"tiny VAE folder {self.tiny_vae!r} holds neither {names} (or .pth/.pt)",
                                      field="tiny_vae")
            return found["encoder"], found["decoder"]
        raise ValidationError(f"tiny VAE {self.tiny_vae!r} does not exist", field="tiny_vae")

    def replace(self, **changes: Any) -> BackendOptions:
        return replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where.

    ``model`` is ``"demo"`` (the model shipped in the repo), a local folder in diffusers layout or a
    hub id. ``device``/``dtype`` ``"auto"`` pick CUDA + bf16 when available, else CPU + fp32.
    ``complex_human_instruction``: ``None`` uses the model's own default (SANA-Sprint's long prefix;
    none for the demo model), ``False`` disables it, ``True`` forces diffusers' default prefix.
    """

    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "torch"
    prompt_cache_size: int = 256
    #: Text tokens per prompt; ``None`` = the model's ``ditstream.json`` value, else 300 (SANA's).
    #: Padding is masked out of cross-attention, so a shorter length changes cost, not results,
    #: for prompts that fit.
    max_sequence_length: int | None = None
    complex_human_instruction: bool | None = None
    local_files_only: bool = True
    #: Profile, engine cache and tiny VAE of the backend (``create_backend``'s options).
    backend_options: BackendOptions = field(default_factory=BackendOptions)
    #: LoRA adapters to load (``engine.lora.LoraSpec``; ``--lora NAME=PATH[:SCALE]``).
    loras: tuple[Any, ...] = ()


@dataclass(frozen=True)
class FilterConfig:
    """Stochastic similarity filter (StreamDiffusion's SSF), per stream.

    Skip probability is ``max(0, 1 - (1 - c) / (1 - threshold))`` for cosine similarity ``c`` between
    the new input and the last processed one; never more than ``max_skip`` skips in a row.
    """

    enabled: bool = False
    threshold: float = 0.98
    max_skip: int = 10
    seed: int | None = None
    downscale: int = 32

    def validate(self) -> FilterConfig:
        if not 0.0 <= self.threshold < 1.0:
            raise ValidationError(
                f"filter.threshold must be in [0, 1), got {self.threshold}", field="filter.threshold"
            )
        if not 0 <= self.max_skip <= 1000:
            raise ValidationError(f"filter.max_skip must be in [0, 1000], got {self.max_skip}", field="filter.max_skip")
        if not 4 <= self.downscale <= 256:
            raise ValidationError(f"filter.downscale must be in [4, 256], got {self.downscale}", field="filter.downscale")
        return self


@dataclass(frozen=True)
class StreamConfig:
    """Everything that decides a stream's (or a one-shot job's) output.

    ``steps`` is the number of model calls per frame (1–4). img2img enters at angle
    ``strength · π/2``; txt2img starts from pure noise. ``timesteps`` overrides the step list with
    explicit angles (descending, in (0, π/2]).

    ``prompt`` is a string or a blend (``WeightedPrompt``s; lists of ``{"text", "weight"}`` dicts are
    converted), mixed in embedding space by ``prompt_interpolation``; ``seed`` an int or a blend of
    ``WeightedSeed``s (the noises are slerped). ``transition_frames`` glides to a new config over that
    many output frames (0 = jump); ``feedback`` ∈ [0, 1) mixes the previous output's latent into each
    img2img frame's entry (0 = off). The maths of all four is in ``engine.sampler``. ``loras`` picks
    the loaded LoRA adapters' scales (``{"name": scale}``; names left out are off); ``None`` runs each at
    its ``--lora`` default scale (``engine.lora``).
    """

    prompt: str | tuple[WeightedPrompt, ...] = ""
    mode: Mode = "img2img"
    steps: int = 1
    strength: float = 0.6
    seed: int | tuple[WeightedSeed, ...] = 0
    width: int = 512
    height: int = 512
    guidance_scale: float = 4.5
    timesteps: tuple[float, ...] | None = None
    filter: FilterConfig = field(default_factory=FilterConfig)
    prompt_interpolation: Interpolation = "linear"
    transition_frames: int = 0
    feedback: float = 0.0
    loras: tuple[tuple[str, float], ...] | None = None
    #: Attention memory across frames (``engine.temporal``): weight of past frames' self-attention
    #: states in [0, 1] (0 = off), and the decay of their moving average in [0, 1).
    temporal: float = 0.0
    temporal_decay: float = DEFAULT_TEMPORAL_DECAY
    #: Scale ``temporal`` and ``feedback`` down per frame by the input's measured motion (``engine.motion``).
    motion_adaptive: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.loras, dict):
            object.__setattr__(self, "loras", tuple(sorted(self.loras.items())))
        object.__setattr__(self, "prompt", blend_entries(self.prompt, WeightedPrompt, "text", "prompt"))
        object.__setattr__(self, "seed", blend_entries(self.seed, WeightedSeed, "seed", "seed"))

    @property
    def prompts(self) -> tuple[WeightedPrompt, ...]:
        """The prompt as a blend (a plain string is one entry of weight 1)."""
        return (WeightedPrompt(self.prompt),) if isinstance(self.prompt, str) else self.prompt

    @property
    def seeds(self) -> tuple[WeightedSeed, ...]:
        """The seed as a blend (a plain int is one entry of weight 1)."""
        return (WeightedSeed(self.seed),) if isinstance(self.seed, int) else self.seed

    @property
    def lora_scales(self) -> dict[str, float] | None:
        """``loras`` as a dict (``None``: every adapter at its default scale)."""
        return None if self.loras is None else dict(self.loras)

    @property
    def base_seed(self) -> int:
        """One int for what needs a single seed (the similarity filter): the heaviest seed of a blend."""
        return max(self.seeds, key=lambda s: s.weight).seed

    @property
    def prompt_chars(self) -> int:
        """Characters of all prompt texts together (what ``max_prompt_chars`` bounds)."""
        return sum(len(p.text) for p in self.prompts if isinstance(p.text, str))

    def _validate_temporal(self) -> None:
        for name, v, top, closed in (("temporal", self.temporal, 1.0, True),
                                     ("temporal_decay", self.temporal_decay, 1.0, False)):
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v
            if not ok or not (v <= top if closed else v < top):
                raise ValidationError(f"{name} must be a number in [0, 1{']' if closed else ')'}, got {v!r}",
                                      field=name)
        if not isinstance(self.motion_adaptive, bool):
            raise ValidationError(f"motion_adaptive must be true or false, got {self.motion_adaptive!r}",
                                  field="motion_adaptive")

    def validate(self, *, max_prompt_chars: int = 2000, max_pixels: int = 1024 * 1024,
                 size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> StreamConfig:
        """Check every field; raise ``ValidationError`` naming the field, limit and value."""
        if self.mode not in ("img2img", "txt2img"):
            raise ValidationError(f"mode must be 'img2img' or 'txt2img', got {self.mode!r}", field="mode")
        if not isinstance(self.prompt, (str, tuple)):
            raise ValidationError("prompt must be a string or a list of {text, weight}", field="prompt")
        if isinstance(self.prompt, tuple):
            check_weights(self.prompt, "prompt")
            for i, p in enumerate(self.prompt):
                if not isinstance(p.text, str):
                    raise ValidationError(f"prompt[{i}].text must be a string, got {p.text!r}", field="prompt")
        if self.prompt_chars > max_prompt_chars:
            raise ValidationError(
                f"prompt is {self.prompt_chars} characters; the limit is {max_prompt_chars}", field="prompt"
            )
        if self.prompt_interpolation not in INTERPOLATIONS:
            raise ValidationError(f"prompt_interpolation must be 'linear' or 'slerp', got {self.prompt_interpolation!r}",
                                  field="prompt_interpolation")
        if not 1 <= self.steps <= 4:
            raise ValidationError(f"steps must be in [1, 4], got {self.steps}", field="steps")
        if not 0.0 < self.strength <= 1.0:
            raise ValidationError(f"strength must be in (0, 1], got {self.strength}", field="strength")
        if isinstance(self.seed, tuple):
            check_weights(self.seed, "seed")
        elif not isinstance(self.seed, int):
            raise ValidationError("seed must be an integer or a list of {seed, weight}", field="seed")
        for i, s in enumerate(self.seeds):
            where = "seed" if isinstance(self.seed, int) else f"seed[{i}].seed"
            if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed < 2**63:
                raise ValidationError(f"{where} must be an integer in [0, 2^63), got {s.seed!r}", field="seed")
        if isinstance(self.transition_frames, bool) or not isinstance(self.transition_frames, int) or not (
                0 <= self.transition_frames <= MAX_TRANSITION_FRAMES):
            raise ValidationError(f"transition_frames must be an integer in [0, {MAX_TRANSITION_FRAMES}], "
                                  f"got {self.transition_frames!r}", field="transition_frames")
        if not isinstance(self.feedback, (int, float)) or not 0.0 <= self.feedback < 1.0:
            raise ValidationError(f"feedback must be in [0, 1), got {self.feedback!r}", field="feedback")
        self._validate_temporal()
        self._validate_loras()
        for name, v in (("width", self.width), ("height", self.height)):
            if v <= 0 or v % size_multiple:
                raise ValidationError(
                    f"{name} must be a positive multiple of {size_multiple}, got {v}", field=name
                )
        if self.width * self.height > max_pixels:
            raise ValidationError(
                f"size {self.width}x{self.height} is {self.width * self.height} pixels; the limit is {max_pixels}",
                field="size",
            )
        if not 0.0 <= self.guidance_scale <= 50.0:
            raise ValidationError(f"guidance_scale must be in [0, 50], got {self.guidance_scale}", field="guidance_scale")
        if self.timesteps is not None:
            ts = tuple(float(t) for t in self.timesteps)
            if len(ts) != self.steps:
                raise ValidationError(f"timesteps has {len(ts)} entries but steps is {self.steps}", field="timesteps")
            if any(not 0.0 < t <= math.pi / 2 + 1e-4 for t in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
                raise ValidationError("timesteps must be strictly descending angles in (0, π/2]", field="timesteps")
        self.filter.validate()
        return self

    def _validate_loras(self) -> None:
        from ditstream.engine.lora import check_scale

        if self.loras is None:
            return
        if not isinstance(self.loras, tuple) or len(self.loras) > MAX_BLEND or not all(
                isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in self.loras):
            raise ValidationError(f"loras must be an object of at most {MAX_BLEND} {{name: scale}}", field="loras")
        for name, scale in self.loras:
            check_scale(name, scale)

    def replace(self, **changes: Any) -> StreamConfig:
        """A copy with ``changes``; ``filter`` may be given as a dict of its fields."""
        if isinstance(changes.get("filter"), dict):
            changes["filter"] = replace(self.filter, **changes["filter"])
        if changes.get("timesteps") is not None:
            changes["timesteps"] = tuple(changes["timesteps"])
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loras"] = self.lora_scales
        d["size"] = f"{self.width}x{self.height}"
        return d

    def fields(self) -> dict[str, Any]:
        """Every field by name, values as they are (``replace(**cfg.fields())`` rebuilds ``cfg``): what a
        reconfigure passes so that it never depends on which earlier change the engine has applied."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class BatchConfig:
    """When a tick starts (``engine/batching.py``): wait for expected frames, at most ``max_wait`` ticks."""

    #: Longest the engine idles with work pending, waiting for expected frames, as a fraction of
    #: the recent tick duration; 0 = start a tick as soon as any stream has work.
    max_wait: float = 0.5
    #: An expected frame is given up on this many mean prediction errors after its predicted time…
    grace: float = 2.0
    #: …but never less than this (seconds): scheduling jitter of the threads that deliver frames
    #: (2 ms left 12 % of closed-loop calls a sample short on a busy 2-core machine; docs/benchmarks.md).
    min_grace_s: float = 0.005
    #: Weight of the newest sample in the running means (intervals, gaps, errors, tick duration).
    smoothing: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_wait <= 4.0:
            raise ValueError(f"batching.max_wait must be in [0, 4] ticks, got {self.max_wait}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"batching.smoothing must be in (0, 1], got {self.smoothing}")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler settings: batch bound, batch formation and queue sizes."""

    max_batch: int = 16
    batching: BatchConfig = field(default_factory=BatchConfig)
    #: Pending input frames per stream (``queues.FrameInbox``): 2 keeps a client's two frames in
    #: flight; a frame that sat through a tick is still replaced by a newer one (latest wins).
    inbox_depth: int = 2
    output_queue_size: int = 4
    idle_wait_s: float = 0.05
    max_pixels: int = 1024 * 1024
    max_prompt_chars: int = 2000
    #: Emit float32 [0, 1] images instead of uint8 (parity tests compare before rounding).
    output_float: bool = False
