"""The measuring steps of ``bench gpu`` on one grid: build the model, time the diffusers loop, then each
backend while the budget lasts (set up, check its outputs against torch, time it), then the diffusers loop
again (drift shows up there). ``gpu.run_gpu_bench`` owns the result file, the watchdog and the refusals.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ditstream.bench.gpu import (
    _diffusers_call,
    _inputs,
    _profile_of,
    build_components,
    count_tflop,
    one_step_img2img,
)
from ditstream.bench.gpu_timing import BenchResult, BenchRow, p90, time_calls

Shape = tuple[int, int]  # (size, batch)


class GpuRun:
    """One bench run's inputs and what the steps share (components, inputs, torch's outputs, baseline)."""

    def __init__(self, result: BenchResult, shapes: list[Shape], dev: torch.device, *, budget_s: float,
                 started: float, cache_dir: str | None, min_time: float, min_calls: int, trt_opt_level: int,
                 say: Callable[[str], None], add: Callable[[BenchRow], None], factory: Callable[..., Any]) -> None:
        self.result, self.shapes, self.dev = result, shapes, dev
        self.sizes, self.batch_sizes = _profile_of(shapes)
        self.budget_s, self.started, self.cache_dir = budget_s, started, cache_dir
        self.min_time, self.min_calls, self.trt_opt_level = min_time, min_calls, trt_opt_level
        self.say, self.add, self.factory = say, add, factory
        self.baseline: dict[Shape, float] = {}

    def run(self, arch: str, torch_dtype: torch.dtype, backends: Sequence[str], checkpoint: Callable[[], None]) -> None:
        self._prepare(arch, torch_dtype)
        checkpoint()
        # 1. Baseline: the diffusers pipeline loop (measured again at the end: drift shows up there).
        self._run_baseline("diffusers")
        # 2. Each backend, while the budget lasts.
        for name in backends:
            self._run_backend(name)
        # 3. The baseline again.
        self._run_baseline("diffusers-end")

    def _prepare(self, arch: str, torch_dtype: torch.dtype) -> None:
        """The model, its FLOPs per frame, the inputs per shape and torch's outputs for them."""
        result = self.result
        self.say(f"building {arch} ({result.dtype}) on {result.device}; grid {result.info['grid']}")
        t0 = time.monotonic()
        self.components = build_components(arch, self.dev, torch_dtype)
        result.setup_s["model"] = round(time.monotonic() - t0, 2)
        from ditstream.engine.backends.torch_backend import TorchBackend

        reference = TorchBackend(self.components)
        for size in self.sizes:
            result.tflop_per_frame[size] = float(f"{count_tflop(reference, self.components, size):.6g}")
        self.inputs = {shape: _inputs(self.components, shape[1], shape[0]) for shape in self.shapes}
        with torch.inference_mode():
            self.expected = {shape: one_step_img2img(reference, self.components, *self.inputs[shape]).float().cpu()
                             for shape in self.shapes}

    def _timed(self, backend_name: str, fn: Callable[[], Any], size: int, batch: int) -> BenchRow:
        with torch.inference_mode():
            times = time_calls(fn, self.dev, min_time=self.min_time, min_iters=self.min_calls)
        return _row(backend_name, size, batch, times, self.result.tflop_per_frame[size])

    def _run_baseline(self, label: str) -> None:
        call = _diffusers_call(self.components)
        for size, batch in self.shapes:
            images, ehs, mask, _ = self.inputs[(size, batch)]
            images01 = (images.float() + 1) / 2
            row = self._timed(label, functools.partial(call, images01, ehs, mask, size), size, batch)
            self.baseline.setdefault((size, batch), row.seconds_per_call or 0.0)
            self.add(row)
            self.say(f"{label} {size}² b{batch}: {row.fps:.2f} fps (median {row.seconds_per_call * 1e3:.2f} ms, "
                     f"p90 {row.p90_s * 1e3:.2f} ms)")

    def _run_backend(self, name: str) -> None:
        if self.budget_s - (time.monotonic() - self.started) < 30:
            for s, b in self.shapes:
                self.add(BenchRow(name, s, b, status="skipped", note="time budget spent"))
            self.say(f"{name}: skipped (time budget spent)")
            return
        backend = self._set_up(name)
        if backend is not None:
            self._measure(name, backend)
            backend = None  # free its engines/graphs before the next backend builds its own
        _free(self.dev)

    def _set_up(self, name: str) -> Any:
        """The backend built and warmed for every shape, or None with a row per shape saying why."""
        try:
            t0 = time.monotonic()
            # Leave room for measuring and for the closing baseline after this backend's setup.
            deadline = self.started + self.budget_s - 20 - 3 * len(self.shapes) * max(self.min_time, 0.5)
            backend = self.factory(name, self.components, self.sizes, self.batch_sizes, self.cache_dir,
                                   deadline=deadline, opt_level=self.trt_opt_level)
            for size, batch in self.shapes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"warm-up stopped at its deadline ({self.budget_s:.0f} s budget)")
                backend.warmup([(batch, size, size)])
            self.result.setup_s[name] = round(time.monotonic() - t0, 2)
            return backend
        except Exception as exc:  # report why, keep measuring the others
            status = "skipped" if isinstance(exc, TimeoutError) else "unavailable"
            for s, b in self.shapes:
                self.add(BenchRow(name, s, b, status=status, note=str(exc)[:300]))
            self.say(f"{name}: {status} ({exc})")
            return None

    def _measure(self, name: str, backend: Any) -> None:
        components = self.components
        errors = _check_outputs(backend, components, self.shapes, self.inputs, self.expected)
        for size, batch in self.shapes:
            row = self._timed(name, functools.partial(one_step_img2img, backend, components,
                                                      *self.inputs[(size, batch)]), size, batch)
            row.speedup_vs_diffusers = round(self.baseline[(size, batch)] / row.seconds_per_call, 2)
            row.max_abs_err = errors[(size, batch)]
            notes = []
            if backend.dtype != components.dtype:
                notes.append(f"transformer {str(backend.dtype).removeprefix('torch.')}")
            if row.max_abs_err is not None and row.max_abs_err > _tolerance(components.dtype):
                notes.append(f"output differs from torch by {row.max_abs_err:.3g}")
            row.note = "; ".join(notes)
            self.add(row)
            self.say(f"{name} {size}² b{batch}: {row.fps:.2f} fps ({row.speedup_vs_diffusers}× diffusers, "
                     f"max |Δ| vs torch {row.max_abs_err:.3g})")


def _free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _tolerance(dtype: torch.dtype) -> float:
    """Largest max-abs difference from torch on [-1, 1] images that still counts as the same output."""
    return 2e-2 if dtype == torch.float32 else 0.15


def _check_outputs(backend: Any, components: Any, shapes: list[Shape], inputs: dict[Shape, tuple[torch.Tensor, ...]],
                   expected: dict[Shape, torch.Tensor]) -> dict[Shape, float]:
    """Max |backend - torch| per shape, running the shapes interleaved (A B C, then C B A)."""
    errors: dict[Shape, float] = {}
    with torch.inference_mode():
        for shape in [*shapes, *reversed(shapes)]:
            out = one_step_img2img(backend, components, *inputs[shape]).float().cpu()
            err = (out - expected[shape]).abs().max().item() if out.shape == expected[shape].shape else math.inf
            errors[shape] = max(errors.get(shape, 0.0), err)
    return errors


def _row(backend: str, size: int, batch: int, times: Sequence[float], tflop: float) -> BenchRow:
    median = statistics.median(times)
    fps = batch / median
    return BenchRow(backend, size, batch, seconds_per_call=round(median, 6), p90_s=round(p90(times), 6),
                    mean_s=round(statistics.fmean(times), 6), calls=len(times), fps=round(fps, 2),
                    tflops=round(fps * tflop, 2))
