"""``ditstream bench quality``: the demo model's figures, scored by the model-independent evaluator.

Measures, on the engine's own sampling code (``engine.generate.Generator``, ``engine.core``):
* one-step txt2img over all 280 captions: colour / shape / background agreement and sharpness;
* the same at 2 steps;
* one-step img2img on synthetic clips of a moving shape with a prompt naming another colour:
  centroid error against the input's true centroid, and colour agreement with the prompt;
* the same through a 2-step stream (stream batch, ``EngineCore``);
* frames per second of one-step img2img at batch 1 (encode + transformer + decode, torch backend);
* live control (issue 19): the flicker measure (``flicker``) on a near-static noisy clip with latent
  feedback 0 and 0.5, the moving-shape clips through a stream with feedback 0.5 (at the standard
  16 frames per revolution and at 32), and a 10-frame transition from a red to a blue circle read
  frame by frame.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np
from ditstream.engine.demo import dataset as ds
from ditstream.engine.demo.evaluator import read_image, score

logger = logging.getLogger(__name__)

#: Clips for the img2img check: (shape, input colour, background, prompt colour).
CLIPS: tuple[tuple[str, str, str, str], ...] = (
    ("circle", "red", "white", "blue"),
    ("square", "yellow", "black", "green"),
    ("triangle", "blue", "yellow", "red"),
    ("star", "white", "purple", "cyan"),
    ("ring", "green", "white", "purple"),
)


def _components(model: str, threads: int):
    import torch
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.loader import load_components

    torch.set_num_threads(threads)
    return load_components(ModelConfig(model=model, device="cpu", dtype="fp32"))


def _defaults(components) -> dict[str, Any]:
    d = {"width": 64, "height": 64, "strength": 0.6, "guidance_scale": 4.5}
    d.update(components.defaults or {})
    return d


def txt2img_scores(generator, defaults: dict[str, Any], n: int, steps: int, seed: int,
                   stride: int = 1) -> dict[str, float]:
    """Generate ``n`` images over the captions (index ``i·stride mod 280``) and score them.

    ``stride`` coprime with 280 spreads a small subset over all shapes, colours and backgrounds.
    """
    from ditstream.engine.config import StreamConfig

    caps = ds.all_captions()
    images, targets = [], []
    for i in range(n):
        shape, colour, bg = caps[(i * stride) % len(caps)]
        cfg = StreamConfig(prompt=ds.caption_for(shape, colour, bg), mode="txt2img", steps=steps, seed=seed + i,
                           width=defaults["width"], height=defaults["height"],
                           guidance_scale=defaults["guidance_scale"])
        images.append(generator.generate(cfg))
        targets.append((shape, colour, bg))
    return score(images, targets).as_dict()


def clip_frames(clip: tuple[str, str, str, str], frames: int) -> tuple[np.ndarray, list[ds.ShapeSpec], str]:
    shape, colour, bg, new_colour = clip
    spec = ds.ShapeSpec(shape, colour, bg, 32.0, 32.0, 14.0)
    video, specs = ds.moving_shape_video(frames, spec)
    return video, specs, ds.caption_for(shape, new_colour, bg)


def flicker(frames: list[np.ndarray]) -> float:
    """The flicker measure: mean absolute difference of consecutive output frames, in 0–255 units.

    Measured on a near-static noisy clip (``noisy_static_clip``), where an ideal stream would return
    the same image every frame: whatever changes is flicker. Lower is steadier.
    """
    f = [np.asarray(x, np.float32) for x in frames]
    if len(f) < 2:
        raise ValueError("flicker needs at least two frames")
    return float(np.mean([np.abs(b - a).mean() for a, b in itertools.pairwise(f)]))


def _img2img_figures(outputs: list[np.ndarray], specs: list[ds.ShapeSpec], prompt_colours: list[str]) -> dict[str, float]:
    errs, colour_ok, found = [], [], []
    for out, spec, want in zip(outputs, specs, prompt_colours):
        r = read_image(out)
        cx, cy = ds.true_centroid(spec)
        found.append(r.centroid is not None)
        errs.append(float(np.hypot(r.centroid[0] - cx, r.centroid[1] - cy)) if r.centroid else float(spec.size))
        colour_ok.append(r.colour == want)
    return {"n": len(outputs), "centroid_err_mean": float(np.mean(errs)), "centroid_err_max": float(np.max(errs)),
            "colour": float(np.mean(colour_ok)), "found": float(np.mean(found))}


def img2img_one_step(generator, defaults: dict[str, Any], frames: int, strength: float, seed: int,
                     clips: tuple[tuple[str, str, str, str], ...] = CLIPS) -> dict[str, float]:
    from ditstream.engine.config import StreamConfig

    outs, specs, want = [], [], []
    for clip in clips:
        video, clip_specs, prompt = clip_frames(clip, frames)
        cfg = StreamConfig(prompt=prompt, mode="img2img", steps=1, strength=strength, seed=seed,
                           width=defaults["width"], height=defaults["height"],
                           guidance_scale=defaults["guidance_scale"])
        for frame, spec in zip(video, clip_specs):
            outs.append(generator.generate(cfg, frame))
            specs.append(spec)
            want.append(clip[3])
    return _img2img_figures(outs, specs, want)


def img2img_stream(components, defaults: dict[str, Any], frames: int, strength: float, steps: int, seed: int,
                   clips: tuple[tuple[str, str, str, str], ...] = CLIPS, feedback: float = 0.0) -> dict[str, float]:
    """The clips through ``EngineCore`` (stream batch of ``steps`` slots); outputs matched by ``seq``."""
    from ditstream.engine.backends import create_backend
    from ditstream.engine.config import StreamConfig
    from ditstream.engine.core import EngineCore
    from ditstream.engine.prompt_cache import PromptCache
    from ditstream.engine.types import Frame

    core = EngineCore(components, create_backend("torch", components), PromptCache(components))
    outs, specs, want = [], [], []
    for clip in clips:
        video, clip_specs, prompt = clip_frames(clip, frames)
        cfg = StreamConfig(prompt=prompt, mode="img2img", steps=steps, strength=strength, seed=seed,
                           width=defaults["width"], height=defaults["height"],
                           guidance_scale=defaults["guidance_scale"], feedback=feedback)
        state = core.add(cfg)
        got = []
        for k, frame in enumerate(video):
            core.submit(state.id, Frame(image=frame, seq=k))
            got.extend(core.step())
        got.extend(core.flush())
        core.remove(state.id)
        for o in got:
            outs.append(np.asarray(o.image))
            specs.append(clip_specs[o.seq])
            want.append(clip[3])
    return _img2img_figures(outs, specs, want)


def _core(components):
    from ditstream.engine.backends import create_backend
    from ditstream.engine.core import EngineCore
    from ditstream.engine.prompt_cache import PromptCache

    return EngineCore(components, create_backend("torch", components), PromptCache(components))


def _stream_images(core, cfg, video, changes: dict[int, Any] | None = None) -> list[np.ndarray]:
    """One stream through ``core``: frame k of ``video`` (None for txt2img) → its output, in order;
    ``changes`` maps a frame index to a config applied just before that frame."""
    from ditstream.engine.types import Frame

    state = core.add(cfg)
    got = []
    for k, frame in enumerate(video):
        if changes and k in changes:
            core.reconfigure(state.id, changes[k])
        core.submit(state.id, Frame(image=frame, seq=k))
        got.extend(core.step())
    got.extend(core.flush())
    core.remove(state.id)
    return [np.asarray(o.image) for o in sorted(got, key=lambda o: o.seq)]


def noisy_static_clip(frames: int, noise: float = 12.0, seed: int = 0) -> tuple[np.ndarray, str]:
    """A near-static clip: one red circle, still, under fresh Gaussian pixel noise (σ = ``noise``)
    every frame — sensor noise on a still scene; the prompt names blue. Returns (video, prompt)."""
    rng = np.random.default_rng(seed)
    base = ds.render(ds.ShapeSpec("circle", "red", "white", 32.0, 32.0, 14.0)).astype(np.float32)
    video = np.stack([np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
                      for _ in range(frames)])
    return video, ds.caption_for("circle", "blue", "white")


def flicker_figures(components, defaults: dict[str, Any], strength: float, feedbacks=(0.0, 0.5), frames: int = 24,
                    noise: float = 12.0, seed: int = 0, settle: int = 4) -> dict[str, float]:
    """The flicker measure of a one-step img2img stream on ``noisy_static_clip`` per feedback value
    (the first ``settle`` outputs are left out: feedback starts from nothing)."""
    from ditstream.engine.config import StreamConfig

    core = _core(components)
    video, prompt = noisy_static_clip(frames, noise, seed)
    out = {}
    for f in feedbacks:
        cfg = StreamConfig(prompt=prompt, mode="img2img", steps=1, strength=strength, seed=seed,
                           width=defaults["width"], height=defaults["height"],
                           guidance_scale=defaults["guidance_scale"], feedback=f)
        out[f"feedback_{f:g}"] = flicker(_stream_images(core, cfg, video)[settle:])
    return out


def colour_position(image: np.ndarray, start: str, end: str) -> float | None:
    """Where the evaluator's shape colour lies on the line from palette ``start`` to ``end`` (0 → 1)."""
    from ditstream.engine.demo.evaluator import coverage

    _, _, fg = coverage(image)
    if fg is None:
        return None
    a, b = (np.asarray(ds.COLOURS[c], np.float32) for c in (start, end))
    return float((fg - a) @ (b - a) / ((b - a) @ (b - a)))


def transition_readings(components, defaults: dict[str, Any], frames: int = 10, seed: int = 0,
                        before: int = 2, after: int = 1) -> list[dict[str, Any]]:
    """A txt2img stream on "a red circle on a white background" that gets "a blue circle …" with
    ``transition_frames: frames`` before frame ``before``; per output: the evaluator's colour and
    shape, and ``colour_position`` on the red → blue line."""
    from ditstream.engine.config import StreamConfig

    red, blue = ds.caption_for("circle", "red", "white"), ds.caption_for("circle", "blue", "white")
    cfg = StreamConfig(prompt=red, mode="txt2img", steps=1, seed=seed, width=defaults["width"],
                       height=defaults["height"], guidance_scale=defaults["guidance_scale"])
    images = _stream_images(_core(components), cfg, [None] * (before + frames + after),
                            {before: cfg.replace(prompt=blue, transition_frames=frames)})
    out = []
    for im in images:
        r = read_image(im)
        pos = colour_position(im, "red", "blue")
        out.append({"colour": r.colour, "shape": r.shape, "position": None if pos is None else round(pos, 3)})
    return out


def measure_fps(components, defaults: dict[str, Any], strength: float, seconds: float = 3.0) -> dict[str, float]:
    """One-step img2img at batch 1 through a 1-slot stream (encode + transformer + decode)."""
    from ditstream.engine.backends import create_backend
    from ditstream.engine.config import StreamConfig
    from ditstream.engine.core import EngineCore
    from ditstream.engine.prompt_cache import PromptCache
    from ditstream.engine.types import Frame

    core = EngineCore(components, create_backend("torch", components), PromptCache(components))
    video, _, prompt = clip_frames(CLIPS[0], 16)
    state = core.add(StreamConfig(prompt=prompt, mode="img2img", steps=1, strength=strength,
                                  width=defaults["width"], height=defaults["height"],
                                  guidance_scale=defaults["guidance_scale"]))
    for k in range(5):  # warm-up
        core.submit(state.id, Frame(image=video[k % 16], seq=k))
        core.step()
    n, t0 = 0, time.perf_counter()
    times = []
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        core.submit(state.id, Frame(image=video[n % 16], seq=n))
        core.step()
        times.append(time.perf_counter() - t)
        n += 1
    times_ms = np.asarray(times) * 1000
    return {"fps": float(n / (time.perf_counter() - t0)), "median_ms": float(np.median(times_ms)),
            "best_fps": float(1000.0 / times_ms.min()), "frames": n}


def run_quality(model: str = "demo", *, n: int = 280, frames: int = 16, strength: float | None = None,
                seed: int = 0, threads: int = 2, fps_seconds: float = 3.0) -> dict[str, Any]:
    """All figures of the model card, as a dict."""
    from ditstream.engine.generate import Generator

    components = _components(model, threads)
    defaults = _defaults(components)
    strength = float(defaults["strength"] if strength is None else strength)
    generator = Generator(components)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"model": model, "strength": strength, "guidance_scale": defaults["guidance_scale"],
                              "threads": threads, "intermediate_angle": components.intermediate_angle}
    report["txt2img_1step"] = txt2img_scores(generator, defaults, n, 1, seed)
    report["txt2img_2step"] = txt2img_scores(generator, defaults, n, 2, seed)
    report["img2img_1step"] = img2img_one_step(generator, defaults, frames, strength, seed)
    report["img2img_stream_2step"] = img2img_stream(components, defaults, frames, strength, 2, seed)
    report["flicker"] = flicker_figures(components, defaults, strength, seed=seed)
    report["img2img_feedback_0.5"] = img2img_stream(components, defaults, frames, strength, 1, seed, feedback=0.5)
    report["img2img_feedback_0.5_slow"] = img2img_stream(components, defaults, 2 * frames, strength, 1, seed,
                                                         feedback=0.5)
    report["transition_10"] = transition_readings(components, defaults, 10, seed)
    report["speed"] = measure_fps(components, defaults, strength, fps_seconds)
    from ditstream.engine.demo.temporal_quality import temporal_report

    report["temporal"] = temporal_report(components, defaults, strength, seed=seed)
    report["bench_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def format_report(r: dict[str, Any]) -> str:
    def t2i(k: str) -> str:
        d = r[k]
        return (f"{k:22s} n={d['n']:4d}  colour {d['colour']:6.1%}  shape {d['shape']:6.1%}  "
                f"background {d['background']:6.1%}  sharpness {d['sharpness']:.3f}")

    def i2i(k: str) -> str:
        d = r[k]
        return (f"{k:22s} n={d['n']:4d}  centroid err mean {d['centroid_err_mean']:.2f}px "
                f"max {d['centroid_err_max']:.2f}px  prompt colour {d['colour']:6.1%}")

    s = r["speed"]
    fl = r["flicker"]
    steps = r["transition_10"]
    lines = [
        f"model {r['model']}  strength {r['strength']}  guidance {r['guidance_scale']}  threads {r['threads']}  "
        f"2-step txt2img angles [π/2, {r['intermediate_angle']}]",
        t2i("txt2img_1step"), t2i("txt2img_2step"), i2i("img2img_1step"), i2i("img2img_stream_2step"),
        f"{'flicker':22s} " + "  ".join(f"{k} {v:.4f}" for k, v in fl.items())
        + f"  (mean |Δ| of consecutive outputs, 0-255, near-static noisy clip; ratio "
          f"{fl['feedback_0'] / max(fl['feedback_0.5'], 1e-12):.2f}x)",
        i2i("img2img_feedback_0.5") + "  (16 frames/revolution)",
        i2i("img2img_feedback_0.5_slow") + "  (32 frames/revolution)",
        f"{'transition 10 frames':22s} " + " ".join(f"{t['colour']}:{t['position']}" for t in steps),
        f"{'speed (img2img 1 step)':22s} {s['fps']:.1f} fps  (median {s['median_ms']:.1f} ms/frame, "
        f"best {s['best_fps']:.1f} fps, batch 1, torch, 64x64)",
    ]
    if "temporal" in r:
        from ditstream.engine.demo.temporal_quality import format_temporal

        lines += ["attention memory (issue 26): flicker, exactness (max |Δ| vs off, still noiseless), "
                  "tracking mean/worst px and ghost share at 1/3/6 px per frame", format_temporal(r["temporal"])]
    lines.append(f"bench took {r['bench_seconds']} s")
    return "\n".join(lines)
