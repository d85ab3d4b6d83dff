"""``ditstream bench engine``: stream batch vs sequential, cross-batched vs one-at-a-time, SSF skip rates.

Every ratio is measured side by side in one run on the same frames, because this machine is shared
and noisy; absolute fps are printed too but only the ratios are comparable across machines.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ditstream.engine.config import BackendOptions, EngineConfig, FilterConfig, ModelConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.generate import Generator
from ditstream.engine.similarity import SimilarityFilter
from ditstream.engine.synthetic import PRESETS, make_pipeline_folder
from ditstream.engine.types import Frame


def moving_clip(n: int, size: int, seed: int = 0, speed: int = 3) -> list[np.ndarray]:
    """A synthetic clip: a bright square moving over a textured background."""
    rs = np.random.RandomState(seed)
    bg = (rs.rand(size, size, 3) * 80 + 60).astype(np.uint8)
    side = size // 4
    frames = []
    for i in range(n):
        f = bg.copy()
        x = (i * speed) % (size - side)
        y = (size - side) // 2 + int(np.round((size // 6) * np.sin(i / 4)))
        f[y : y + side, x : x + side] = (230, 60, 40)
        frames.append(f)
    return frames


def static_clip(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """The same frame with faint sensor noise, as a still camera gives."""
    rs = np.random.RandomState(seed)
    base = moving_clip(1, size, seed)[0].astype(np.int16)
    return [np.clip(base + rs.randint(-2, 3, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _wall(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _paired(baseline: Callable[[], Any], candidate: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """Run the two arms interleaved ``repeats`` times.

    Returns (median baseline time, median candidate time, median of the per-pair ratios): each
    ratio compares two runs made back to back, so load that comes and goes on a shared machine
    hits both arms of a pair alike.
    """
    base, cand = [], []
    for _ in range(repeats):
        base.append(_wall(baseline))
        cand.append(_wall(candidate))
    ratios = [b / c for b, c in zip(base, cand, strict=True)]
    return statistics.median(base), statistics.median(cand), statistics.median(ratios)


def _stream_run(gen: Generator, configs: list[StreamConfig], frames: list[np.ndarray], max_batch: int) -> int:
    core = EngineCore(gen.components, gen.backend, gen.prompts, EngineConfig(max_batch=max_batch))
    ids = [core.add(c).id for c in configs]
    n = 0
    for i, f in enumerate(frames):
        for sid in ids:
            core.submit(sid, Frame(image=f, seq=i))
        n += len(core.step())
    n += len(core.flush())
    return n


def run_engine_bench(model: str = "demo", size: int = 64, frames: int = 12, streams: int = 8, steps: int = 4,
                     repeats: int = 5, threads: int | None = None, backend: str = "torch",
                     options: BackendOptions | None = None, device: str = "auto") -> dict[str, Any]:
    """Run the three measurements and return a JSON-able dict (``backend`` built with ``options`` on
    ``device``: auto, cpu, cuda, cuda:N)."""
    options = options if options is not None else BackendOptions()
    if threads:
        torch.set_num_threads(threads)
    if model in PRESETS:
        tmp = tempfile.TemporaryDirectory()
        path = make_pipeline_folder(f"{tmp.name}/pipe", model, seed=0, complex_human_instruction=False,
                                    max_sequence_length=32)
        gen = Generator.from_config(ModelConfig(model=str(path), backend=backend, device=device,
                                                backend_options=options))
    else:
        gen = Generator.from_config(ModelConfig(model=model, backend=backend, device=device, backend_options=options))
    clip = moving_clip(frames, size)
    base = StreamConfig(prompt="a red square on a gray background", mode="img2img", strength=0.8, seed=1,
                        width=size, height=size)
    # warm up (prompt cache, allocator, first-call overheads)
    _stream_run(gen, [base.replace(steps=steps)], clip[:2], 64)
    gen.generate_unit(base.replace(steps=steps), clip[0])

    # 1. sequential n-step sampling vs stream batch (one stream, same frames)
    cfg_n = base.replace(steps=steps)
    t_seq, t_sb, sb_ratio = _paired(lambda: [gen.generate_unit(cfg_n, f) for f in clip],
                                    lambda: _stream_run(gen, [cfg_n], clip, 64), repeats)

    # 2. N one-step streams one at a time vs cross-batched
    cfgs = [base.replace(seed=s, prompt=f"a {c} square on a gray background")
            for s, c in zip(range(streams), ["red", "blue", "green", "white", "black", "pink", "cyan", "gray"] * 4)]
    t_one, t_cross, cross_ratio = _paired(lambda: [_stream_run(gen, [c], clip, 64) for c in cfgs],
                                         lambda: _stream_run(gen, cfgs, clip, 64), repeats)

    # 3. similarity filter skip rate on a static and a moving clip (StreamDiffusion defaults)
    rates = {}
    for name, c in (("static", static_clip(200, size)), ("moving", moving_clip(200, size))):
        flt = SimilarityFilter(FilterConfig(enabled=True, threshold=0.98, max_skip=10, seed=0))
        rates[name] = sum(flt.should_skip(f) for f in c) / len(c)

    # 4. attention memory: the same one-step streams with ``temporal`` 1 against off (1 stream, then N)
    from ditstream.engine.temporal import temporal_refusal

    memory: dict[str, Any] = {"temporal_refused": temporal_refusal(gen.backend)}
    if memory["temporal_refused"] is None:
        for n in (1, streams):
            off = cfgs[:n]
            on = [c.replace(temporal=1.0) for c in off]
            _stream_run(gen, on, clip[:2], 64)  # warm up (the compile backend's memory graph compiles here)
            t_off, t_on, ratio = _paired(lambda off=off: _stream_run(gen, off, clip, 64),
                                         lambda on=on: _stream_run(gen, on, clip, 64), repeats)
            memory[f"temporal_cost_batch{n}"] = 1.0 / ratio  # time with memory / time without, per pair
            memory[f"temporal_ms_per_frame_batch{n}"] = [1000 * t / (n * frames) for t in (t_off, t_on)]

    params = sum(p.numel() for p in gen.components.transformer.parameters())
    return {
        "model": model, "backend": gen.backend.name, "transformer_params": params, "size": size, "frames": frames, "steps": steps,
        "streams": streams, "torch_threads": torch.get_num_threads(), "device": str(gen.components.device),
        "sequential_fps": frames / t_seq, "stream_batch_fps": frames / t_sb,
        "stream_batch_speedup": sb_ratio, "repeats": repeats,
        "one_at_a_time_fps": streams * frames / t_one, "cross_batched_fps": streams * frames / t_cross,
        "cross_batch_speedup": cross_ratio,
        "ssf_skip_rate_static": rates["static"], "ssf_skip_rate_moving": rates["moving"],
        **memory,
    }


def format_table(r: dict[str, Any]) -> str:
    rows = [
        (f"sequential {r['steps']}-step", f"{r['sequential_fps']:.1f} fps", ""),
        (f"stream batch {r['steps']}-step", f"{r['stream_batch_fps']:.1f} fps", f"{r['stream_batch_speedup']:.2f}x"),
        (f"{r['streams']} streams one at a time", f"{r['one_at_a_time_fps']:.1f} fps", ""),
        (f"{r['streams']} streams cross-batched", f"{r['cross_batched_fps']:.1f} fps", f"{r['cross_batch_speedup']:.2f}x"),
        ("SSF skip rate, static clip", f"{100 * r['ssf_skip_rate_static']:.0f} %", ""),
        ("SSF skip rate, moving clip", f"{100 * r['ssf_skip_rate_moving']:.0f} %", ""),
    ]
    for key, value in r.items():
        if key.startswith("temporal_cost_batch"):
            n = key.removeprefix("temporal_cost_batch")
            off_ms, on_ms = r[f"temporal_ms_per_frame_batch{n}"]
            rows.append((f"temporal 1 vs off, {n} stream(s)", f"{off_ms:.1f}->{on_ms:.1f} ms", f"{value:.3f}"))
    if r.get("temporal_refused"):
        rows.append(("temporal 1 vs off", "refused", ""))
    head = (f"model={r['model']} ({r['transformer_params'] / 1e6:.2f}M transformer params) size={r['size']} "
            f"device={r['device']} threads={r['torch_threads']}")
    w = max(len(a) for a, _, _ in rows)
    return "\n".join([head, *(f"{a:<{w}}  {b:>12}  {c:>7}" for a, b, c in rows)])


def _spin() -> None:  # a busy CPU core, standing in for the other work on a shared machine
    while True:
        pass


def run_threads_bench(model: str = "demo", size: int = 64, frames: int = 12, candidates: tuple[int, ...] = (1, 2, 0),
                      load: int = 1, repeats: int = 5) -> dict[str, Any]:
    """ms per frame of one img2img stream for each torch thread count, with ``load`` busy processes.

    The arms run interleaved (one clip each, round-robin ``repeats`` times) so load that comes and
    goes hits them alike; 0 is torch's default, one thread per core. This is the measurement behind
    ``engine.threads.DEFAULT_THREADS``.
    """
    import multiprocessing as mp
    import os

    gen = Generator.from_config(ModelConfig(model=model))
    clip = moving_clip(frames, size)
    cfg = StreamConfig(prompt="a red square on a gray background", mode="img2img", strength=0.8, seed=1,
                       width=size, height=size)
    default = torch.get_num_threads()
    spinners = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(load)]
    for p in spinners:
        p.start()
    times: dict[int, list[float]] = {n: [] for n in candidates}
    try:
        for n in candidates:  # warm-up per thread count (OpenMP pools are built lazily)
            torch.set_num_threads(n or default)
            _stream_run(gen, [cfg], clip[:2], 8)
        for _ in range(repeats):
            for n in candidates:
                torch.set_num_threads(n or default)
                times[n].append(_wall(lambda: _stream_run(gen, [cfg], clip, 8)) / len(clip))
    finally:
        for p in spinners:
            p.kill()
        torch.set_num_threads(default)
    ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    return {"model": model, "size": size, "frames": frames, "repeats": repeats, "cores": os.cpu_count(),
            "busy_processes": load, "torch_default_threads": default,
            "ms_per_frame": {("default" if n == 0 else str(n)): round(v, 2) for n, v in ms.items()}}
