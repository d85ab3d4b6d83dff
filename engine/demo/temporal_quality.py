"""``ditstream bench quality`` for attention memory (issue 26): flicker, exactness, tracking and ghosts.

Clips (the demo model's 64², σ 10 pixel noise unless said): a still noisy red circle (flicker: the
mean absolute difference of consecutive outputs), the same still and noiseless (exactness: the
largest difference from the stream without memory), and the circle moving on a circle of radius
12 px at 1, 3 and 6 px per frame (tracking: output centroid against the input's true centroid, mean
and worst frame; ghosts: the share of output shape pixels more than 3 px outside the input shape).
Arms: off, ``feedback`` 0.5, ``temporal``, ``temporal`` + ``motion_adaptive``; the curve sweeps
``temporal`` and ``temporal_decay``.

``state_ceiling`` bounds what any attention memory can do for flicker: it runs the still noisy clip
with the self-attention state of chosen blocks replaced by the state the still *noiseless* clip gives
(what a perfect memory of the scene would hold, with none of the frame's noise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import coverage, read_image
from ditstream.engine.demo.quality import _core, _stream_images, flicker

SPEEDS = (1.0, 3.0, 6.0)
NOISE = 10.0
PATH_RADIUS = 12.0
SHAPE = ds.ShapeSpec("circle", "red", "white", 32.0, 32.0, 14.0)
PROMPT = ds.caption_for("circle", "blue", "white")


def moving_clip(speed: float, frames: int, noise: float = NOISE, seed: int = 0) -> tuple[np.ndarray, list[ds.ShapeSpec]]:
    """The circle moving ``speed`` px per frame along a circle of ``PATH_RADIUS`` px (0: still), σ ``noise``."""
    rng = np.random.default_rng(seed)
    video, specs = [], []
    for k in range(frames):
        a = k * speed / PATH_RADIUS
        s = ds.ShapeSpec(SHAPE.shape, SHAPE.colour, SHAPE.background, 32.0 + PATH_RADIUS * np.cos(a),
                         32.0 + PATH_RADIUS * np.sin(a), SHAPE.radius, SHAPE.size)
        img = ds.render(s).astype(np.float32)
        if noise > 0:
            img = img + rng.normal(0, noise, img.shape)
        video.append(np.clip(img, 0, 255).astype(np.uint8))
        specs.append(s)
    return np.stack(video), specs


def ghost(output: np.ndarray, spec: ds.ShapeSpec, margin: float = 3.0) -> float:
    """Share of the output's shape pixels (α > 0.5) farther than ``margin`` px from the input's shape."""
    alpha, _, _ = coverage(output)
    shape_px = alpha > 0.5
    if not shape_px.any():
        return 0.0
    inside = ds.shape_mask(spec.shape, spec.cx, spec.cy, spec.radius, spec.size) > 0.5
    far = ~_within_distance(inside, margin)
    return float((shape_px & far).sum() / shape_px.sum())


def _within_distance(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels with a ``mask`` pixel no farther than ``radius`` (Euclidean, pixel centres): ``mask``
    dilated by a disk, i.e. ``distance_transform_edt(~mask) <= radius`` without scipy."""
    r = int(radius)
    h, w = mask.shape
    padded = np.pad(mask, r)
    near = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= radius * radius:
                near |= padded[r + dy : r + dy + h, r + dx : r + dx + w]
    return near


def tracking(outputs: list[np.ndarray], specs: list[ds.ShapeSpec]) -> dict[str, float]:
    errs, ghosts = [], []
    for out, spec in zip(outputs, specs, strict=True):
        r = read_image(out)
        cx, cy = ds.true_centroid(spec)
        errs.append(float(np.hypot(r.centroid[0] - cx, r.centroid[1] - cy)) if r.centroid else float(spec.size))
        ghosts.append(ghost(out, spec))
    return {"err_mean": float(np.mean(errs)), "err_max": float(np.max(errs)), "ghost": float(np.mean(ghosts))}


def arm_figures(components, defaults: dict[str, Any], strength: float, arm: dict[str, Any], *, frames: int = 24,
                seed: int = 0, settle: int = 4) -> dict[str, float]:
    """One arm (StreamConfig overrides) on every clip: flicker, exactness and tracking per speed."""
    core = _core(components)
    base = _base_config(defaults, strength, seed)
    cfg = base.replace(**arm)
    out: dict[str, float] = {}
    still, _ = moving_clip(0.0, frames, seed=seed)
    out["flicker"] = flicker(_stream_images(core, cfg, still)[settle:])
    clean, _ = moving_clip(0.0, 8, noise=0.0)
    plain = _stream_images(core, base, clean)
    mine = _stream_images(core, cfg, clean)
    out["exact_max_diff"] = float(max(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()
                                      for a, b in zip(plain, mine, strict=True)))
    for v in SPEEDS:
        video, specs = moving_clip(v, frames, seed=seed)
        for k, x in tracking(_stream_images(core, cfg, video), specs).items():
            out[f"{v:g}px_{k}"] = x
    return out


def _base_config(defaults: dict[str, Any], strength: float, seed: int):
    from ditstream.engine.config import StreamConfig

    return StreamConfig(prompt=PROMPT, mode="img2img", steps=1, strength=strength, seed=seed,
                        width=defaults["width"], height=defaults["height"], guidance_scale=defaults["guidance_scale"])


def state_ceiling(components, defaults: dict[str, Any], strength: float, *, frames: int = 24, seed: int = 0,
                  settle: int = 4, weight: float = 1e6) -> dict[str, float]:
    """Flicker on the still noisy clip when the self-attention state of all blocks (``all``), or of one
    (``block<i>``), is the still noiseless clip's own state instead of the frame's (``off``: unchanged).

    Done with the memory's own hook (``engine.temporal``): the state used is ``own + weight·clean``,
    which normalises to ``clean``'s output within ~1/weight. No memory made of past frames' states can
    steady the state more than this, so if this does not lower flicker, no setting of it will.
    """
    import torch

    core = _core(components)
    hook = core.backend.temporal_attention()
    if hook is None or hook.refusal is not None:
        raise ValueError("state_ceiling needs a backend that carries attention memory (torch)")
    cfg = _base_config(defaults, strength, seed)
    device = core.components.device
    clean, _ = moving_clip(0.0, 1, noise=0.0)
    with hook.call(1, [], [], [], [0], device) as call:  # the noiseless frame's own states, every block
        _stream_images(core, cfg, clean)
    clean_state = call.own()[0]  # (blocks, H, d+1, d)
    still, _ = moving_clip(0.0, frames, seed=seed)
    out = {"off": flicker(_stream_images(core, cfg, still)[settle:])}
    choices = {"all": list(range(hook.blocks))} | {f"block{b}": [b] for b in range(hook.blocks)}
    for name, blocks in choices.items():
        mask = torch.zeros(hook.blocks, 1, 1, 1, device=clean_state.device)
        mask[blocks] = 1.0
        # one row reading ``weight·clean`` in the chosen blocks (0 elsewhere: the own state as it is)
        with hook.call(1, [0], [weight], [clean_state * mask], [], device):
            out[name] = flicker(_stream_images(core, cfg, still)[settle:])
    return out


def default_arms(temporal: float, decay: float) -> dict[str, dict[str, Any]]:
    return {"off": {}, "feedback_0.5": {"feedback": 0.5},
            "temporal": {"temporal": temporal, "temporal_decay": decay},
            "temporal_motion": {"temporal": temporal, "temporal_decay": decay, "motion_adaptive": True},
            "feedback_0.5_motion": {"feedback": 0.5, "motion_adaptive": True},
            "temporal_feedback_0.5_motion": {"temporal": temporal, "temporal_decay": decay, "feedback": 0.5,
                                             "motion_adaptive": True},
            "feedback_0.7_motion": {"feedback": 0.7, "motion_adaptive": True}}


def temporal_report(components, defaults: dict[str, Any], strength: float, *, temporal: float = 1.0,
                    decay: float | None = None, frames: int = 24, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``arms``: every arm's figures (``arm_figures``), keyed by arm name; ``state_ceiling``: its figures."""
    from ditstream.engine.config import DEFAULT_TEMPORAL_DECAY

    d = DEFAULT_TEMPORAL_DECAY if decay is None else decay
    arms = {name: arm_figures(components, defaults, strength, arm, frames=frames, seed=seed)
            for name, arm in default_arms(temporal, d).items()}
    return {"arms": arms, "state_ceiling": state_ceiling(components, defaults, strength, frames=frames, seed=seed)}


def format_temporal(report: dict[str, dict[str, Any]]) -> str:
    head = f"{'arm':<28} flicker  exact  " + "  ".join(f"{v:g}px mean/worst/ghost" for v in SPEEDS)
    rows = [head]
    for name, r in report["arms"].items():
        cells = "  ".join(f"{r[f'{v:g}px_err_mean']:5.2f}/{r[f'{v:g}px_err_max']:5.2f}/{r[f'{v:g}px_ghost']:.3f}"
                          for v in SPEEDS)
        rows.append(f"{name:<28} {r['flicker']:7.3f}  {r['exact_max_diff']:5.1f}  {cells}")
    rows.append("flicker with the self-attention state replaced by the noiseless clip's (the ceiling of any memory): "
                + "  ".join(f"{k} {v:.3f}" for k, v in report["state_ceiling"].items()))
    return "\n".join(rows)


def memory_cost(components, defaults: dict[str, Any], strength: float, batch: int, *, ticks: int = 40,
                repeats: int = 5, warmup: int = 5, seed: int = 0) -> dict[str, float]:
    """Engine time per tick (``EngineCore.step``, median over ``ticks``) with ``batch`` streams of the
    still noisy clip, memory off and ``temporal`` 1, run alternately ``repeats`` times; the best run of
    each (the least disturbed on a shared machine) and their ratio. Not a timed test: a bench."""
    import statistics
    import time

    from ditstream.engine.types import Frame

    still, _ = moving_clip(0.0, ticks + warmup, seed=seed)
    base = _base_config(defaults, strength, seed)
    best = {"off_ms": float("inf"), "temporal_ms": float("inf")}
    core = _core(components)
    for _ in range(repeats):
        for key, cfg in (("off_ms", base), ("temporal_ms", base.replace(temporal=1.0))):
            ids = [core.add(cfg.replace(seed=seed + i)).id for i in range(batch)]
            times = []
            for k, frame in enumerate(still):
                for sid in ids:
                    core.submit(sid, Frame(image=frame, seq=k))
                t0 = time.perf_counter()
                core.step()
                if k >= warmup:
                    times.append(time.perf_counter() - t0)
            core.flush()
            for sid in ids:
                core.remove(sid)
            best[key] = min(best[key], 1000.0 * statistics.median(times))
    return {**best, "ratio": best["temporal_ms"] / best["off_ms"]}


if __name__ == "__main__":  # python -m ditstream.engine.demo.temporal_quality [batch ...]: the cost bench
    import sys

    from ditstream.engine.demo.quality import _components, _defaults

    comps = _components("demo", 1)
    dflt = _defaults(comps)
    for b in [int(a) for a in sys.argv[1:]] or [1, 8]:
        print(f"batch {b}:", memory_cost(comps, dflt, float(dflt["strength"]), b))
