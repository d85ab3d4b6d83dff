"""How ``bench gpu`` times and reports: CUDA-event timing (median, p90 over at least ``MIN_CALLS``), the
rows and the result it writes after every row, library versions, and the watchdog that ends a hung run
with its figures kept."""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Published per-frame cost at 512² (ANCHORS.md), for the notes under the table.
TFLOP_512 = {"transformer": 0.32, "vae_encoder": 1.30, "vae_decoder": 2.09}


#: Timed calls per row (median and p90 need a handful).
MIN_CALLS = 10


@dataclass
class BenchRow:
    backend: str
    resolution: int
    batch: int
    status: str = "ok"
    seconds_per_call: float | None = None  # the median
    p90_s: float | None = None
    mean_s: float | None = None
    calls: int = 0
    fps: float | None = None  # batch / median
    tflops: float | None = None
    speedup_vs_diffusers: float | None = None
    max_abs_err: float | None = None  # vs the torch backend on the same inputs (images in [-1, 1])
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, *, min_time: float = 1.0, min_iters: int = MIN_CALLS,
               max_iters: int = 100) -> list[float]:
    """Seconds of each call after two warm-up calls: at least ``min_iters`` calls and ``min_time`` s.

    On CUDA each call is bracketed by CUDA events (GPU time of the call, no host sync inside the
    loop's measurement); on CPU by ``perf_counter``.
    """
    for _ in range(2):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def time_call(fn: Callable[[], Any], device: torch.device, **kwargs: Any) -> float:
    """Median seconds per call (``time_calls``)."""
    return statistics.median(time_calls(fn, device, **kwargs))


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def library_versions() -> dict[str, str]:
    """Versions of what the figures depend on (missing packages are left out)."""
    from importlib import metadata

    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda or "")}
    for dist in ("ditstream", "diffusers", "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import pynvml

        pynvml.nvmlInit()
        out["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # nvidia-ml-py is optional
        pass
    return out


class Watchdog:
    """Ends a hung bench: after ``deadline`` (monotonic) it calls ``on_fire`` (default: ``os._exit(3)``).

    A TensorRT build, a torch.compile or a CUDA call can hang in native code where no Python deadline
    is checked; the bench's figures must survive that, so ``checkpoint`` is called first.
    """

    def __init__(self, deadline: float, checkpoint: Callable[[str], None],
                 on_fire: Callable[[], None] | None = None, poll_s: float = 0.5) -> None:
        self.deadline, self.checkpoint, self.poll_s = deadline, checkpoint, poll_s
        self.on_fire = on_fire or (lambda: os._exit(3))
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if time.monotonic() >= self.deadline:
                self.fired = True
                try:
                    self.checkpoint("watchdog: the bench overran its budget and was stopped")
                finally:
                    self.on_fire()
                return


def format_table(result: BenchResult) -> str:
    """A fixed-width table plus notes (published per-frame cost, setup times)."""
    versions = result.info.get("versions", {})
    lines = [f"GPU: {result.device} ({result.info.get('compute_capability', '-')}), {result.arch}, {result.dtype}; "
             + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"{'backend':<14} {'res':>5} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'fps':>9} {'TFLOP/s':>9} "
             f"{'vs diffusers':>13} {'max|Δ|':>8}  note"]
    for r in result.rows:
        if r.status != "ok":
            lines.append(f"{r.backend:<14} {r.resolution:>5} {r.batch:>5} {'-':>10} {'-':>9} {'-':>9} {'-':>9} "
                         f"{'-':>13} {'-':>8}  {r.status}: {r.note}")
            continue
        speed = f"{r.speedup_vs_diffusers:.2f}x" if r.speedup_vs_diffusers else "1.00x"
        err = f"{r.max_abs_err:.3g}" if r.max_abs_err is not None else "-"
        lines.append(f"{r.backend:<14} {r.resolution:>5} {r.batch:>5} {r.seconds_per_call * 1e3:>10.2f} "
                     f"{(r.p90_s or 0) * 1e3:>9.2f} {r.fps:>9.2f} {r.tflops:>9.2f} {speed:>13} {err:>8}  "
                     f"{r.note}".rstrip())
    if "watchdog" in result.info:
        lines.append(f"INCOMPLETE: {result.info['watchdog']}")
    per = ", ".join(f"{k}²: {v:.4g}" for k, v in result.tflop_per_frame.items())
    lines.append(f"measured TFLOP per frame (encode+denoise+decode): {per}; published 512²: "
                 f"{sum(TFLOP_512.values()):.2f} ({', '.join(f'{k} {v}' for k, v in TFLOP_512.items())})")
    lines.append("setup seconds (model build, engine builds, compile): "
                 + ", ".join(f"{k} {v}" for k, v in result.setup_s.items()))
    return "\n".join(lines)


def to_json(result: BenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
