"""Backend registry: name -> "module:attr", imported only when chosen.

CPU tests never import tensorrt or onnxruntime because nothing here does until a backend is asked
for by name. ``auto`` is the only name that may pick another backend, and it logs why.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from ditstream.engine.errors import BackendUnavailableError

if TYPE_CHECKING:
    from ditstream.engine.backends.base import Backend
    from ditstream.engine.config import BackendOptions
    from ditstream.engine.loader import ModelComponents

logger = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {
    "torch": "ditstream.engine.backends.torch_backend:TorchBackend",
    "compile": "ditstream.engine.backends.compile_backend:CompileBackend",
    "onnx": "ditstream.engine.backends.onnx_backend:OnnxBackend",
    "tensorrt": "ditstream.engine.backends.tensorrt_backend:TensorRTBackend",
    #: No network: echoes through the real sampler; runs only the null model (``engine.null``).
    "null": "ditstream.engine.backends.null_backend:NullBackend",
}

#: ``auto`` tries these in order of expected speed and takes the first that loads. On CUDA: TensorRT
#: (fused kernels, CUDA graphs) > torch.compile (inductor, CUDA graphs per batch bucket) > eager. On
#: CPU: onnxruntime's fused kernels beat eager torch; torch.compile is left out because its
#: minutes-long C++ compile on first use is a poor default for a server start.
AUTO_ORDER_CUDA = ("tensorrt", "compile", "torch")
AUTO_ORDER_CPU = ("onnx", "torch")


def backend_class(name: str) -> type[Backend]:
    """Import the backend class registered under ``name``."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {sorted([*BACKENDS, 'auto'])}")
    module_name, attr = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not available: {exc}") from exc
    return getattr(module, attr)


def create_backend(name: str, components: ModelComponents, options: BackendOptions | None = None) -> Backend:
    """Build backend ``name`` with ``options`` (profile, engine cache, tiny VAE; ``BackendOptions``).

    A named backend that fails raises, only ``auto`` falls back (logged). With ``options.tiny_vae``
    the tiny autoencoder is loaded and checked first (a wrong file fails before any engine build),
    then wraps the backend's VAE encode/decode.
    """
    from ditstream.engine.config import BackendOptions

    options = (options if options is not None else BackendOptions()).validate()
    tiny = None
    if options.tiny_vae is not None:
        from ditstream.engine.tiny_vae import load_for_model

        tiny = load_for_model(options, components)
    backend = _create(name, components, options)
    if tiny is not None:
        from ditstream.engine.tiny_vae import TinyVaeBackend

        backend = TinyVaeBackend(backend, tiny)
    return backend


def check_loras(name: str, cls: type[Backend], components: ModelComponents) -> None:
    """Refuse a backend that cannot switch LoRA adapters per call when adapters are loaded."""
    if components.loras and not cls.supports_loras:
        raise BackendUnavailableError(
            f"backend {name!r} cannot switch LoRA adapters per call (its weights are fixed in a compiled graph "
            f"or engine); LoRAs ({', '.join(components.loras)}) need --backend torch")


def _create(name: str, components: ModelComponents, options: BackendOptions) -> Backend:
    if name != "auto":
        cls = backend_class(name)
        check_loras(name, cls, components)
        return cls(components, options)
    order = AUTO_ORDER_CUDA if components.device.type == "cuda" else AUTO_ORDER_CPU
    reasons: list[str] = []
    for candidate in order:
        try:
            cls = backend_class(candidate)
            check_loras(candidate, cls, components)
            backend = cls(components, options)
        except BackendUnavailableError as exc:
            reasons.append(f"{candidate}: {exc}")
            continue
        logger.info("backend auto -> %s: fastest available of %s on %s%s", candidate, list(order),
                    components.device.type, f" (skipped {'; '.join(reasons)})" if reasons else "")
        return backend
    raise BackendUnavailableError("no backend could be loaded: " + "; ".join(reasons))
