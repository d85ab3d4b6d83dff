"""LoRA adapters on the transformer: parse ``--lora NAME=PATH[:SCALE]``, load, switch per model call.

Adapters are loaded once with PEFT (diffusers' ``load_lora_adapter``) next to the base weights,
never merged, so that each batched model call can run its own adapter set: ``activate`` sets the
active adapters and their scales before the call (``TorchBackend.set_loras``). An empty set disables
the adapters, so the call runs the base layers alone and equals the base model exactly; a scale of
0 is dropped from a set for the same reason.

Formats read: a diffusers LoRA file (``*.safetensors``, keys ``transformer.…lora_A.weight`` or
without the prefix, as ``save_lora_adapter`` writes them; a ``lora_adapter_metadata`` header holds
rank and alpha), a folder holding one (``pytorch_lora_weights.safetensors``), or a PEFT folder
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.…``). ``PATH``
``demo`` names an adapter shipped with the demo model (``engine/assets/demo/loras/NAME.safetensors``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditstream.engine.errors import ModelLoadError, ValidationError

logger = logging.getLogger(__name__)

DEMO_LORA_DIR = Path(__file__).resolve().parent / "assets" / "demo" / "loras"
#: Largest |scale| a stream may ask of one adapter.
MAX_LORA_SCALE = 4.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIXES = ("base_model.model.", "transformer.")

#: An adapter set as a model call runs it: sorted (name, scale) pairs, no zero scales.
LoraSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora``: the adapter's name, where it is, and the scale streams get unless they pick one."""

    name: str
    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``NAME=PATH[:SCALE]`` (``PATH`` ``demo``: the shipped demo adapter ``NAME``)."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValidationError(f"--lora must be NAME=PATH[:SCALE], got {text!r}", field="lora")
        path, scale = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                path = rest  # a ':' inside the path (e.g. C:\…), no scale
        return cls(name.strip(), path, scale).validate()

    def validate(self) -> LoraSpec:
        if not _NAME.match(self.name):
            raise ValidationError(f"LoRA name {self.name!r} must be 1-64 letters, digits, '_', '-' or '.'",
                                  field="lora")
        check_scale(self.name, self.scale)
        return self

    def resolve(self) -> Path:
        """The file or folder to read (``demo`` → the shipped adapter)."""
        if self.path == "demo":
            path = DEMO_LORA_DIR / f"{self.name}.safetensors"
            if not path.is_file():
                shipped = sorted(p.stem for p in DEMO_LORA_DIR.glob("*.safetensors"))
                raise ModelLoadError(f"no demo LoRA named {self.name!r}; shipped: {', '.join(shipped) or 'none'}")
            return path
        path = Path(self.path).expanduser()
        if not path.exists():
            raise ModelLoadError(f"LoRA {self.name!r}: {self.path!r} does not exist")
        return path


def check_scale(name: str, scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or \
            abs(scale) > MAX_LORA_SCALE:
        raise ValidationError(f"loras.{name} must be a number in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], "
                              f"got {scale!r}", field="loras")
    return float(scale)


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict with keys relative to the transformer, LoRA config dict or None) of ``path``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    config = None
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
            path = path / "adapter_model.safetensors"
        else:
            path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file() or path.suffix != ".safetensors":
        raise ModelLoadError(f"LoRA file {str(path)!r} not found (a .safetensors file, a diffusers LoRA folder "
                             "or a PEFT adapter folder)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if config is None and "lora_adapter_metadata" in meta:
        config = json.loads(meta["lora_adapter_metadata"])
    state = {}
    for key, value in load_file(str(path)).items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    if not any(".lora_A." in k or ".lora_B." in k for k in state):
        raise ModelLoadError(f"{str(path)!r} holds no LoRA weights (no *.lora_A/lora_B keys)")
    if config is not None:  # what diffusers' LoraConfig takes
        config = {k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules", "rank_pattern",
                                                          "alpha_pattern", "use_dora", "lora_bias")}
    return state, config


def load_loras(transformer: Any, specs: tuple[LoraSpec, ...] | list[LoraSpec]) -> dict[str, float]:
    """Load every adapter of ``specs`` onto ``transformer`` (inactive); returns name → default scale."""
    loaded: dict[str, float] = {}
    for spec in specs:
        if spec.name in loaded:
            raise ValidationError(f"two --lora options name {spec.name!r}", field="lora")
        state, config = read_adapter(spec.resolve())
        state = {k: v.to(device=transformer.device, dtype=transformer.dtype) for k, v in state.items()}
        try:
            transformer.load_lora_adapter(state, prefix=None, adapter_name=spec.name, metadata=config)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"LoRA {spec.name!r} ({spec.path}) does not fit this transformer: {exc}") from exc
        if not _layers(transformer, spec.name):
            raise ModelLoadError(f"LoRA {spec.name!r} ({spec.path}) matched no layer of this transformer")
        loaded[spec.name] = spec.scale
        logger.info("loaded LoRA %s from %s (default scale %g, %d layers)", spec.name, spec.path, spec.scale,
                    len(_layers(transformer, spec.name)))
    transformer.requires_grad_(False)
    activate(transformer, ())
    return loaded


def _layers(transformer: Any, name: str) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in transformer.modules() if isinstance(m, LoraLayer) and name in m.lora_A]


def resolve_set(requested: dict[str, float] | None, loaded: dict[str, float]) -> LoraSet:
    """A stream's adapter set: ``requested`` (absent names at 0) or, when ``None``, every adapter at its
    default scale. Unknown names are refused; zero scales dropped (the base model exactly)."""
    if requested is None:
        requested = loaded
    for name in requested:
        if name not in loaded:
            known = ", ".join(sorted(loaded)) or "none (start the server with --lora NAME=PATH)"
            raise ValidationError(f"unknown LoRA {name!r}; loaded: {known}", field="loras")
    return tuple(sorted((n, float(s)) for n, s in requested.items() if s != 0))


def glide_sets(a: LoraSet, b: LoraSet, alpha: float) -> LoraSet:
    """Scales ``alpha`` of the way from ``a`` to ``b`` (names of either; 0 where one lacks a name)."""
    da, db = dict(a), dict(b)
    out = {n: (1.0 - alpha) * da.get(n, 0.0) + alpha * db.get(n, 0.0) for n in {*da, *db}}
    return tuple(sorted((n, s) for n, s in out.items() if s != 0))


def activate(transformer: Any, loras: LoraSet) -> None:
    """Make ``loras`` the transformer's active adapters (empty: adapters off, the base model exactly)."""
    if getattr(transformer, "_ditstream_loras", None) == loras:
        return
    if loras:
        transformer.enable_adapters()
        transformer.set_adapters([n for n, _ in loras], [s for _, s in loras])
    elif getattr(transformer, "peft_config", None):
        transformer.disable_adapters()
    transformer._ditstream_loras = loras
