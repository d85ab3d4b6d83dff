"""onnxruntime backend: the three networks exported once (cached by weights hash) and run by ORT.

Why it exists: it is the portable accelerated path (CPU, CUDA EP, TensorRT EP) and the proof that
our ONNX graphs — the input to every TensorRT build — compute what torch computes. Exports come
from ``trt_build.export`` (TorchScript exporter, dynamic batch/height/width).

Providers: on a CUDA device the CUDA execution provider is required (a CUDA model silently running
on CPU would be a hidden fallback). onnxruntime's TensorRT EP is put in front of it when it is
present and ``tensorrt_provider=True``; it is opt-in because that EP builds an engine inside the
first request of every new shape range (seconds to minutes of stall), whereas our ``tensorrt``
backend builds ahead of time for explicit profiles. On CUDA, inputs and outputs stay on the GPU
through IO binding (no host copies).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from ditstream.engine.backends.base import Backend, BackendLimits
from ditstream.engine.errors import BackendUnavailableError

if TYPE_CHECKING:
    from ditstream.engine.config import BackendOptions

logger = logging.getLogger(__name__)

_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(bfloat16)": "bfloat16"}
_TORCH_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
                "tensor(bfloat16)": torch.bfloat16}


class OnnxBackend(Backend):
    """Runs exported ONNX graphs with onnxruntime.

    ``options.cache_dir``: where exports are kept (default ``~/.cache/ditstream/engines``), the
    folder ``build-engine --onnx-only`` fills. The graphs have dynamic shapes, so the profile in
    ``options`` (when given) only bounds what is admitted and names the sizes warm-up prepares.
    ``tensorrt_provider``: put onnxruntime's TensorRT EP first on CUDA when it is installed.
    """

    name = "onnx"

    def __init__(self, components: Any, options: BackendOptions | None = None, *,
                 tensorrt_provider: bool = False, threads: int | None = None) -> None:
        super().__init__(components, options)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                "backend 'onnx' needs onnxruntime (pip install 'ditstream[onnx]', or onnxruntime-gpu on CUDA)"
            ) from exc
        self._ort = ort
        if self.dtype == torch.bfloat16:
            raise BackendUnavailableError(
                "backend 'onnx' does not run bf16 (onnxruntime has few bf16 kernels); use --dtype fp16 or fp32"
            )
        from ditstream.trt_build.cache import EngineCache
        from ditstream.trt_build.export import get_or_export

        self.cache = EngineCache(self.options.cache_dir)
        self.providers = self._choose_providers(tensorrt_provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.sessions: dict[str, Any] = {}
        for component in ("transformer", "vae_encoder", "vae_decoder"):
            try:
                path = get_or_export(components, component, cache=self.cache)
                self.sessions[component] = ort.InferenceSession(str(path), sess_options=options,
                                                                providers=self.providers)
            except BackendUnavailableError:
                raise
            except Exception as exc:  # export or session creation failed: say which and why
                raise BackendUnavailableError(f"backend 'onnx' could not prepare {component}: {exc}") from exc
        actual = self.sessions["transformer"].get_providers()
        logger.info("onnx backend ready on %s (providers %s)", self.device, actual)

    @property
    def limits(self) -> BackendLimits:
        """Unbounded unless sizes or batch sizes were asked for; then those bound what is admitted."""
        o = self.options
        ws, hs = [w for w, _ in o.resolutions], [h for _, h in o.resolutions]
        return BackendLimits(max_batch=max(o.batches) if o.batches else None,
                             width=(min(ws), max(ws)) if ws else None, height=(min(hs), max(hs)) if hs else None,
                             sizes=o.resolutions)

    def _choose_providers(self, tensorrt_provider: bool) -> list[Any]:
        available = self._ort.get_available_providers()
        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"backend 'onnx' on {self.device} needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"this onnxruntime has {available}"
            )
        device_id = self.device.index or 0
        providers: list[Any] = []
        if tensorrt_provider and "TensorrtExecutionProvider" in available:
            providers.append(("TensorrtExecutionProvider", {
                "device_id": device_id, "trt_fp16_enable": self.dtype == torch.float16,
                "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
                "trt_engine_cache_path": str(self.cache.root / "ort-trt"),
            }))
        providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
        return providers

    # -- running -----------------------------------------------------------------------------

    def _run(self, component: str, feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor:
        session = self.sessions[component]
        inputs = {i.name: i for i in session.get_inputs()}
        typed = {name: t.to(_TORCH_TYPES[inputs[name].type]).contiguous() for name, t in feeds.items()}
        out_meta = session.get_outputs()[0]
        if self.device.type != "cuda":
            result = session.run([out_meta.name], {k: v.cpu().numpy() for k, v in typed.items()})[0]
            return torch.from_numpy(result)
        import numpy as np

        binding = session.io_binding()
        device_id = self.device.index or 0
        for name, tensor in typed.items():
            tensor = tensor.to(self.device)
            typed[name] = tensor  # keep alive until run returns
            binding.bind_input(name, "cuda", device_id, np.dtype(_NP_TYPES[inputs[name].type]),
                               list(tensor.shape), tensor.data_ptr())
        out = torch.empty(out_shape, dtype=_TORCH_TYPES[out_meta.type], device=self.device)
        binding.bind_output(out_meta.name, "cuda", device_id, np.dtype(_NP_TYPES[out_meta.type]),
                            list(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        return out

    def denoise(self, x, timestep, encoder_hidden_states, encoder_attention_mask, guidance):
        session = self.sessions["transformer"]
        names = [i.name for i in session.get_inputs()]
        b = x.shape[0]
        feeds = {
            "sample": x,
            "timestep": _per_sample(timestep, b),
            "encoder_hidden_states": encoder_hidden_states,
            "encoder_attention_mask": encoder_attention_mask,
        }
        if "guidance" in names:
            if guidance is None:
                raise ValueError("this transformer embeds guidance; pass a guidance tensor")
            feeds["guidance"] = _per_sample(guidance, b)
        out_channels = int(self.components.transformer.config.out_channels or x.shape[1])
        out = self._run("transformer", feeds, (b, out_channels, x.shape[2], x.shape[3]))
        return out.to(device=x.device, dtype=self.dtype)

    def encode(self, images):
        f = self.components.vae_scale_factor
        b, _, h, w = images.shape
        out = self._run("vae_encoder", {"images": images},
                        (b, self.components.vae.config.latent_channels, h // f, w // f))
        return out.to(images.device)

    def decode(self, latents):
        f = self.components.vae_scale_factor
        b, _, h, w = latents.shape
        out = self._run("vae_decoder", {"latents": latents}, (b, 3, h * f, w * f))
        return out.to(latents.device)


def _per_sample(value: torch.Tensor | float, batch: int) -> torch.Tensor:
    """A (B,) fp32 tensor from a scalar, a 0-d or a (B,) tensor."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(batch)
    return t.reshape(batch)
