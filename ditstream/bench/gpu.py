"""``ditstream bench gpu``: one-step img2img fps per backend vs the diffusers pipeline loop, one GPU.

The real SANA-Sprint 0.6B transformer and DC-AE f32c32 architectures are built with random weights
(timing does not depend on weight values; nothing is downloaded). For every available backend and
every (resolution, batch) asked for, one call = VAE encode → one transformer call → VAE decode with
the sampler's own math (``engine.sampler``), timed with CUDA synchronisation; the baseline is
diffusers' ``SanaSprintImg2ImgPipeline`` called the way a user would, on the same GPU in the same
run. Achieved TFLOP/s is printed beside each fps from a FLOP count of the same call
(``torch.utils.flop_counter``), so the figures can be held against the GPU's peak.

A time budget keeps the whole run inside ``budget_s`` (TensorRT engine builds and torch.compile
count against it; backends that no longer fit are reported as skipped, never silently dropped).
The ``tiny`` architecture exists so the bench machinery is tested on CPU.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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
#: Published per-frame cost at 512² (ANCHORS.md), for the notes under the table.
TFLOP_512 = {"transformer": 0.32, "vae_encoder": 1.30, "vae_decoder": 2.09}

DEFAULT_BACKENDS = ("torch", "tensorrt", "compile", "onnx")  # the headline first, in case the budget runs out
SEQ_LEN = 300
STRENGTH = 0.6


class BenchRefused(RuntimeError):
    """The bench cannot run here (no CUDA); the CLI prints the message and exits non-zero."""


@dataclass
class BenchRow:
    backend: str
    resolution: int
    batch: int
    status: str = "ok"
    seconds_per_call: float | None = None
    fps: float | None = None
    tflops: float | None = None
    speedup_vs_diffusers: float | None = None
    note: str = ""


@dataclass
class BenchResult:
    device: str
    arch: str
    dtype: str
    rows: list[BenchRow] = field(default_factory=list)
    setup_s: dict[str, float] = field(default_factory=dict)
    tflop_per_frame: dict[int, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "arch": self.arch, "dtype": self.dtype, "info": self.info,
                "setup_s": self.setup_s, "tflop_per_frame": {str(k): v for k, v in self.tflop_per_frame.items()},
                "rows": [r.__dict__ for r in self.rows]}


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, min_time: float = 1.0, min_iters: int = 3,
              max_iters: int = 50) -> float:
    """Mean seconds per call after two warm-up calls (at least ``min_iters`` or ``min_time`` seconds)."""
    for _ in range(2):
        fn()
    _sync(device)
    iters, start = 0, time.perf_counter()
    while iters < max_iters and (iters < min_iters or time.perf_counter() - start < min_time):
        fn()
        iters += 1
    _sync(device)
    return (time.perf_counter() - start) / iters


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


def run_gpu_bench(*, resolutions: Sequence[int] = (512, 1024), batches: Sequence[int] = (1, 4, 8),
                  backends: Sequence[str] = DEFAULT_BACKENDS, arch: str = "sana-sprint-0.6b", dtype: str = "bf16",
                  budget_s: float = 480.0, device: str = "cuda", cache_dir: str | None = None,
                  min_time: float = 1.0, trt_opt_level: int = 3,
                  progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run the bench; see the module docstring. ``device="cpu"`` is only for the ``tiny`` self-test."""
    say = progress or (lambda msg: logger.info("%s", msg))
    started = time.monotonic()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchRefused("`ditstream bench gpu` needs a CUDA GPU and none is visible (torch.cuda.is_available() "
                           "is False); run it on a CUDA machine")
    if dev.type != "cuda" and arch != "tiny":
        raise BenchRefused("the GPU bench runs the real architecture only on CUDA")
    from ditstream.engine.loader import resolve_dtype

    torch_dtype = resolve_dtype(dtype, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = BenchResult(device=name, arch=arch, dtype=dtype)
    result.info = {"torch": torch.__version__, "budget_s": budget_s, "strength": STRENGTH,
                   "trt_opt_level": trt_opt_level}
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        result.info["compute_capability"] = f"{major}.{minor}"
    say(f"building {arch} ({dtype}) on {name}")
    t0 = time.monotonic()
    components = build_components(arch, dev, torch_dtype)
    result.setup_s["model"] = round(time.monotonic() - t0, 2)
    from ditstream.engine.backends.torch_backend import TorchBackend

    for size in resolutions:
        result.tflop_per_frame[size] = float(f"{count_tflop(TorchBackend(components), components, size):.6g}")

    # 1. Baseline: the diffusers pipeline loop.
    baseline: dict[tuple[int, int], float] = {}
    call = _diffusers_call(components)
    for size in resolutions:
        for batch in batches:
            images, ehs, mask, _ = _inputs(components, batch, size)
            images01 = (images.float() + 1) / 2
            with torch.inference_mode():
                secs = time_call(functools.partial(call, images01, ehs, mask, size), dev, min_time=min_time)
            baseline[(size, batch)] = secs
            result.rows.append(_row("diffusers", size, batch, secs, result.tflop_per_frame[size]))
            say(f"diffusers {size}² b{batch}: {batch / secs:.2f} fps")

    # 2. Each backend, while the budget lasts.
    for name_ in backends:
        left = budget_s - (time.monotonic() - started)
        if left < 30:
            result.rows += [BenchRow(name_, s, b, status="skipped", note="time budget spent")
                            for s in resolutions for b in batches]
            say(f"{name_}: skipped (time budget spent)")
            continue
        try:
            t0 = time.monotonic()
            backend = _make_backend(name_, components, resolutions, batches, cache_dir,
                                    deadline=started + budget_s - 20, opt_level=trt_opt_level)
            backend.warmup([(b, s, s) for s in resolutions for b in batches])
            result.setup_s[name_] = round(time.monotonic() - t0, 2)
        except Exception as exc:  # report why, keep measuring the others
            result.rows += [BenchRow(name_, s, b, status="unavailable", note=str(exc)[:200])
                            for s in resolutions for b in batches]
            say(f"{name_}: unavailable ({exc})")
            continue
        for size in resolutions:
            for batch in batches:
                inputs = _inputs(components, batch, size)
                with torch.inference_mode():
                    secs = time_call(functools.partial(one_step_img2img, backend, components, *inputs), dev,
                                     min_time=min_time)
                row = _row(name_, size, batch, secs, result.tflop_per_frame[size])
                row.speedup_vs_diffusers = round(baseline[(size, batch)] / secs, 2)
                if backend.dtype != components.dtype:
                    row.note = f"transformer {str(backend.dtype).removeprefix('torch.')}"
                result.rows.append(row)
                say(f"{name_} {size}² b{batch}: {row.fps:.2f} fps ({row.speedup_vs_diffusers}× diffusers)")
        backend = None  # free its engines/graphs before the next backend builds its own
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result.info["total_s"] = round(time.monotonic() - started, 1)
    return result


def _row(backend: str, size: int, batch: int, secs: float, tflop: float) -> BenchRow:
    fps = batch / secs
    return BenchRow(backend, size, batch, seconds_per_call=round(secs, 5), fps=round(fps, 2),
                    tflops=round(fps * tflop, 2))


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


def format_table(result: BenchResult) -> str:
    """A fixed-width table plus notes (published per-frame cost, setup times)."""
    lines = [f"GPU: {result.device} ({result.info.get('compute_capability', '-')}), {result.arch}, {result.dtype}",
             f"{'backend':<10} {'res':>5} {'batch':>5} {'ms/call':>9} {'fps':>9} {'TFLOP/s':>9} {'vs diffusers':>13}"
             "  note"]
    for r in result.rows:
        if r.status != "ok":
            lines.append(f"{r.backend:<10} {r.resolution:>5} {r.batch:>5} {'-':>9} {'-':>9} {'-':>9} {'-':>13}"
                         f"  {r.status}: {r.note}")
            continue
        speed = f"{r.speedup_vs_diffusers:.2f}x" if r.speedup_vs_diffusers else "1.00x"
        lines.append(f"{r.backend:<10} {r.resolution:>5} {r.batch:>5} {r.seconds_per_call * 1e3:>9.2f} "
                     f"{r.fps:>9.2f} {r.tflops:>9.2f} {speed:>13}  {r.note}".rstrip())
    per = ", ".join(f"{k}²: {v:.4g}" for k, v in result.tflop_per_frame.items())
    lines.append(f"measured TFLOP per frame (encode+denoise+decode): {per}; published 512²: "
                 f"{sum(TFLOP_512.values()):.2f} ({', '.join(f'{k} {v}' for k, v in TFLOP_512.items())})")
    lines.append("setup seconds (model build, engine builds, compile): "
                 + ", ".join(f"{k} {v}" for k, v in result.setup_s.items()))
    return "\n".join(lines)


def to_json(result: BenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
