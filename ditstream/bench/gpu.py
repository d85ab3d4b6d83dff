"""``ditstream bench gpu``: one-step img2img fps per backend vs the diffusers pipeline loop, one GPU.

The real SANA-Sprint 0.6B transformer and DC-AE f32c32 architectures are built with random weights
(timing does not depend on weight values; nothing is downloaded). For every available backend and
every (resolution, batch) asked for, one call = VAE encode → one transformer call → VAE decode with
the sampler's own math (``engine.sampler``), timed with CUDA synchronisation; the baseline is
diffusers' ``SanaSprintImg2ImgPipeline`` called the way a user would, on the same GPU in the same
run. Achieved TFLOP/s is printed beside each fps from a FLOP count of the same call
(``torch.utils.flop_counter``), so the figures can be held against the GPU's peak.

It always leaves figures: the JSON (``json_out``) is rewritten after every row; a time budget keeps
the run inside ``budget_s`` (TensorRT builds are cancelled and torch.compile warm-ups stopped at
their deadline; a backend that no longer fits is reported as skipped, never silently dropped); and a
watchdog thread writes what was measured and ends the process if one call hangs past the budget.
The default grid (512² batch 1 and 4, 1024² batch 1) is exactly the TensorRT profile built, so the
engine build stays small. Each row is the median and p90 of ≥ 10 calls timed with CUDA events, each
backend's output is checked against torch's with the grid's shapes interleaved (a CUDA graph replayed
for the wrong shape shows up there), library versions and the GPU's name are recorded, and the
diffusers baseline is measured again at the end (clock or thermal drift shows up as a difference).
The ``tiny`` architecture exists so the bench machinery is tested on CPU.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ditstream.bench.gpu_timing import (
    MIN_CALLS,
    BenchResult,
    BenchRow,
    Watchdog,
    library_versions,
    to_json,
)

logger = logging.getLogger(__name__)

#: SANA-Sprint 0.6B (Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers): 593.5 M parameters.
SANA_SPRINT_06B: dict[str, Any] = dict(
    in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
    num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152, caption_channels=2304,
    mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=32, patch_size=1,
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None, guidance_embeds=True,
    guidance_embeds_scale=0.1, qk_norm="rms_norm_across_heads", timestep_scale=1.0,
)
#: DC-AE f32c32 sana-1.0 (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers): encoder 153.0 M, decoder 159.2 M.
DC_AE_F32C32: dict[str, Any] = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)

DEFAULT_BACKENDS = ("torch", "tensorrt", "compile", "onnx")  # the headline first, in case the budget runs out
#: (size, batch) measured by default: exactly the shapes the TensorRT profile is built for.
DEFAULT_GRID: tuple[tuple[int, int], ...] = ((512, 1), (512, 4), (1024, 1))
SEQ_LEN = 300
STRENGTH = 0.6


class BenchRefused(RuntimeError):
    """The bench cannot run here (no CUDA); the CLI prints the message and exits non-zero."""






def build_components(arch: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Random-weight transformer + VAE of ``arch`` (``sana-sprint-0.6b`` or ``tiny``) as ModelComponents."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel, SCMScheduler

    from ditstream.engine.loader import ModelComponents

    if arch == "tiny":
        from ditstream.engine.synthetic import build_components as tiny

        parts = tiny("tiny")
        transformer, vae = parts["transformer"], parts["vae"]
    elif arch == "sana-sprint-0.6b":
        torch.manual_seed(0)
        with torch.device(device):  # allocate on the GPU directly: 0.6 B params init fast there
            transformer = SanaTransformer2DModel(**SANA_SPRINT_06B)
            vae = AutoencoderDC(**DC_AE_F32C32)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose sana-sprint-0.6b or tiny")
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # DC-AE must not run fp16
    transformer.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.to(device=device, dtype=vae_dtype).eval().requires_grad_(False)
    return ModelComponents(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                           scheduler=SCMScheduler(), device=device, dtype=dtype, source=f"random:{arch}")


def one_step_img2img(backend: Any, components: Any, images: torch.Tensor, ehs: torch.Tensor,
                     mask: torch.Tensor, noise: torch.Tensor, strength: float = STRENGTH) -> torch.Tensor:
    """Encode → one model call at t₁ = strength·π/2 → decode, with the engine's sampler math."""
    from ditstream.engine import sampler

    sd, sf = components.sigma_data, components.scaling_factor
    b = images.shape[0]
    z = backend.encode(images)
    clean = sampler.from_vae_latent(z.float(), sd, sf)
    t1 = torch.full((b,), strength * math.pi / 2, device=images.device)
    x = sampler.entry_latent(t1, noise, sd, clean)
    x_in, s = sampler.model_input(x, t1, sd)
    guidance = sampler.guidance_vector(torch.full((b,), 4.5, device=images.device), components.guidance_embeds_scale)
    raw = backend.denoise(x_in, s, ehs, mask, guidance)
    x0 = sampler.denoised(x, x_in, raw.float(), t1, s, sd)
    return backend.decode(sampler.to_vae_latent(x0, sd, sf))














def count_tflop(backend: Any, components: Any, size: int) -> float:
    """TFLOP of one batch-1 img2img call at ``size``² (torch FLOP counter: matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = _inputs(components, 1, size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        one_step_img2img(backend, components, *inputs)
    return counter.get_total_flops() / 1e12


def _inputs(components: Any, batch: int, size: int) -> tuple[torch.Tensor, ...]:
    dev, f = components.device, components.vae_scale_factor
    g = torch.Generator().manual_seed(batch * 7 + size)
    images = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dev, components.vae.dtype)
    seq = SEQ_LEN if components.transformer.config.caption_channels > 64 else 8
    ehs = torch.randn(batch, seq, components.transformer.config.caption_channels, generator=g).to(dev, components.dtype)
    mask = torch.ones(batch, seq, dtype=torch.int64, device=dev)
    noise = torch.randn(batch, components.latent_channels, size // f, size // f, generator=g).to(dev)
    return images, ehs, mask, noise


def _diffusers_call(components: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], Any]:
    """The baseline: SanaSprintImg2ImgPipeline, one step, prompt embeddings given (no text encoder)."""
    from diffusers import SanaSprintImg2ImgPipeline

    pipe = SanaSprintImg2ImgPipeline(tokenizer=None, text_encoder=None, vae=components.vae,
                                     transformer=components.transformer, scheduler=components.scheduler)
    pipe.set_progress_bar_config(disable=True)

    def call(images01: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor, size: int) -> Any:
        return pipe(image=images01, prompt_embeds=ehs, prompt_attention_mask=mask, num_inference_steps=1,
                    max_timesteps=STRENGTH * math.pi / 2, intermediate_timesteps=None, strength=1.0,
                    guidance_scale=4.5, height=size, width=size, output_type="pt", use_resolution_binning=False,
                    complex_human_instruction=None).images

    return call


def bench_grid(resolutions: Sequence[int] | None = None, batches: Sequence[int] | None = None
               ) -> list[tuple[int, int]]:
    """``(size, batch)`` pairs: every size × batch asked for, else ``DEFAULT_GRID``."""
    if not resolutions and not batches:
        return list(DEFAULT_GRID)
    sizes = list(resolutions or sorted({s for s, _ in DEFAULT_GRID}))
    return [(s, b) for s in sizes for b in (batches or (1,))]


def _profile_of(grid: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The sizes and batches of ``grid`` in first-seen order (the first of each is the profile's opt)."""
    sizes = list(dict.fromkeys(s for s, _ in grid))
    batches = list(dict.fromkeys(b for _, b in grid))
    return sizes, batches


def run_gpu_bench(*, resolutions: Sequence[int] | None = None, batches: Sequence[int] | None = None,
                  grid: Sequence[tuple[int, int]] | None = None,
                  backends: Sequence[str] = DEFAULT_BACKENDS, arch: str = "sana-sprint-0.6b", dtype: str = "bf16",
                  budget_s: float = 480.0, device: str = "cuda", cache_dir: str | None = None,
                  min_time: float = 1.0, min_calls: int = MIN_CALLS, trt_opt_level: int = 3,
                  progress: Callable[[str], None] | None = None, json_out: str | Path | None = None,
                  watchdog_s: float | None = None, on_watchdog: Callable[[], None] | None = None,
                  backend_factory: Callable[..., Any] | None = None) -> BenchResult:
    """Run the bench; see the module docstring. ``device="cpu"`` is only for the ``tiny`` self-test.

    ``grid`` (or ``resolutions`` × ``batches``; default ``DEFAULT_GRID``) is what is measured and what
    the TensorRT profile covers. ``json_out`` is rewritten after every row. ``watchdog_s`` (default
    ``budget_s + 60``) after the start, the watchdog writes ``json_out`` and calls ``on_watchdog``
    (default: end the process with status 3). ``backend_factory(name, components, sizes, batches,
    cache_dir, deadline=..., opt_level=...)`` replaces ``create_backend`` (tests use a fake).
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    started = time.monotonic()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchRefused("`ditstream bench gpu` needs a CUDA GPU and none is visible (torch.cuda.is_available() "
                           "is False); run it on a CUDA machine")
    if dev.type != "cuda" and arch != "tiny":
        raise BenchRefused("the GPU bench runs the real architecture only on CUDA")
    from ditstream.engine.loader import resolve_dtype

    shapes = list(grid) if grid else bench_grid(resolutions, batches)
    torch_dtype = resolve_dtype(dtype, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = BenchResult(device=name, arch=arch, dtype=dtype)
    result.info = {"torch": torch.__version__, "budget_s": budget_s, "strength": STRENGTH,
                   "trt_opt_level": trt_opt_level, "grid": [f"{s}x{b}" for s, b in shapes],
                   "timing": f"median and p90 of >= {min_calls} calls "
                             + ("(CUDA events)" if dev.type == "cuda" else "(perf_counter)"),
                   "versions": library_versions(), "complete": False}
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        result.info["compute_capability"] = f"{major}.{minor}"
    lock = threading.Lock()

    def checkpoint(note: str | None = None) -> None:
        """Write the JSON as it stands (atomically): every row so far is kept whatever happens next."""
        with lock:
            result.info["elapsed_s"] = round(time.monotonic() - started, 1)
            if note:
                result.info["watchdog"] = note
            if json_out is not None:
                path = Path(json_out)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(to_json(result))
                os.replace(tmp, path)

    def add(row: BenchRow) -> None:
        with lock:
            result.rows.append(row)
        checkpoint()

    watchdog = Watchdog(started + (watchdog_s if watchdog_s is not None else budget_s + 60), checkpoint,
                        on_watchdog).start()
    try:
        from ditstream.bench.gpu_run import GpuRun

        run = GpuRun(result, shapes, dev, budget_s=budget_s, started=started, cache_dir=cache_dir, min_time=min_time,
                     min_calls=min_calls, trt_opt_level=trt_opt_level, say=say, add=add,
                     factory=backend_factory or _make_backend)
        run.run(arch, torch_dtype, backends, checkpoint)
    finally:
        watchdog.stop()
    result.info["total_s"] = round(time.monotonic() - started, 1)
    result.info["complete"] = not watchdog.fired
    checkpoint()
    return result


def _make_backend(name: str, components: Any, resolutions: Sequence[int], batches: Sequence[int],
                  cache_dir: str | None, *, deadline: float | None = None, opt_level: int = 3) -> Any:
    from ditstream.engine.backends import create_backend
    from ditstream.engine.config import BackendOptions

    # The options `build-engine -r … -b … --cache-dir …` takes: engines built ahead are the ones measured.
    options = BackendOptions(resolutions=tuple((s, s) for s in resolutions), batches=tuple(batches),
                             seq_len=SEQ_LEN if components.transformer.config.caption_channels > 64 else 8,
                             cache_dir=cache_dir, opt_level=opt_level, build_deadline=deadline)
    if name == "onnx" and components.dtype == torch.bfloat16:
        # onnxruntime has almost no bf16 kernels: measure it as a user would run it, with an fp16
        # transformer and an fp32 DC-AE (DC-AE must not run fp16).
        import copy
        import dataclasses

        components = dataclasses.replace(
            components, transformer=copy.deepcopy(components.transformer).half(),
            vae=copy.deepcopy(components.vae).float(), dtype=torch.float16)
    return create_backend(name, components, options)




