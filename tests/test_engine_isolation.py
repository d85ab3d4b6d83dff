"""Isolation: streams batched together produce exactly what each produces alone."""

from __future__ import annotations

import numpy as np
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.types import Frame
from testkit import run_streams

SIZE = 32
CONFIGS = [
    StreamConfig(prompt="a red circle", mode="img2img", steps=1, strength=0.5, seed=1, width=SIZE, height=SIZE),
    StreamConfig(prompt="a blue square on a white background", mode="img2img", steps=2, strength=0.8, seed=2,
                 width=SIZE, height=SIZE, guidance_scale=2.0),
    StreamConfig(prompt="a cat", mode="txt2img", steps=3, seed=3, width=SIZE, height=SIZE),
    StreamConfig(prompt="a dog on a horse", mode="img2img", steps=4, strength=0.6, seed=4, width=SIZE, height=SIZE),
]


def _run(g, configs, frames, max_batch=16):
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True, max_batch=max_batch))
    return run_streams(core, configs, frames), core.batch_sizes


def _frames(n):
    rs = np.random.RandomState(1)
    return [(rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8) for _ in range(n)]


def test_four_different_streams_batched_equal_each_alone(tiny_generator):
    frames = _frames(5)
    together, sizes = _run(tiny_generator, CONFIGS, frames)
    assert max(sizes) == sum(c.steps for c in CONFIGS)  # all ten slots really shared one call
    for k, cfg in enumerate(CONFIGS):
        alone, _ = _run(tiny_generator, [cfg], frames)
        assert [o.seq for o in together[k]] == list(range(len(frames)))
        assert [o.seq for o in alone[0]] == list(range(len(frames)))
        for a, b in zip(alone[0], together[k], strict=True):
            np.testing.assert_allclose(b.image, a.image, atol=1e-5, rtol=0)
    # different streams really produce different images (the comparison above is not vacuous)
    assert np.abs(together[0][0].image - together[1][0].image).max() > 1e-3


def test_max_batch_bounds_every_call_without_changing_results(tiny_generator):
    frames = _frames(4)
    full, _ = _run(tiny_generator, CONFIGS, frames)
    bounded, sizes = _run(tiny_generator, CONFIGS, frames, max_batch=3)
    assert max(sizes) <= 3
    for a_list, b_list in zip(full, bounded, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            np.testing.assert_allclose(b.image, a.image, atol=1e-5, rtol=0)


def test_reconfigure_applies_to_next_frames_and_in_flight_frames_finish(tiny_generator):
    g = tiny_generator
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))
    a = StreamConfig(prompt="a red circle", steps=2, strength=0.8, seed=1, width=SIZE, height=SIZE)
    b = a.replace(prompt="a blue star", steps=1, seed=9)
    sid = core.add(a).id
    frames = _frames(3)
    out = []
    core.submit(sid, Frame(image=frames[0], seq=0))
    out += core.step()
    core.reconfigure(sid, b)
    core.submit(sid, Frame(image=frames[1], seq=1))
    out += core.step()
    out += core.flush()
    assert [o.seq for o in out] == [0, 1]
    np.testing.assert_allclose(out[0].image, g.generate_unit(a, frames[0]).numpy(), atol=1e-4)
    np.testing.assert_allclose(out[1].image, g.generate_unit(b, frames[1]).numpy(), atol=1e-4)


def test_remove_stream_drops_its_work_and_keeps_others(tiny_generator):
    g = tiny_generator
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))
    s1 = core.add(CONFIGS[0]).id
    s2 = core.add(CONFIGS[3]).id
    frames = _frames(2)
    core.submit(s1, Frame(image=frames[0], seq=0))
    core.submit(s2, Frame(image=frames[0], seq=0))
    core.step()
    core.remove(s2)
    out = core.flush()
    core.submit(s1, Frame(image=frames[1], seq=1))
    out += core.flush()
    assert {o.stream_id for o in out} == {s1}
    assert not core.has_work()


LIVE = [
    StreamConfig(prompt=[{"text": "a red circle", "weight": 0.7}, {"text": "a cat", "weight": 0.3}],
                 prompt_interpolation="slerp", mode="img2img", steps=2, strength=0.7, seed=1, feedback=0.4,
                 width=SIZE, height=SIZE),
    StreamConfig(prompt=[{"text": "a dog on a horse", "weight": 1}, {"text": "a blue square", "weight": 1}],
                 mode="img2img", steps=1, strength=0.6, seed=[{"seed": 2, "weight": 1}, {"seed": 7, "weight": 2}],
                 width=SIZE, height=SIZE, guidance_scale=2.0),
    StreamConfig(prompt="a blue square on a white background", mode="img2img", steps=3, strength=0.8,
                 seed=[{"seed": 4, "weight": 1}, {"seed": 5, "weight": 1}], feedback=0.7, width=SIZE, height=SIZE),
]
#: Mid-clip reconfigures (frame → (stream, changes)): a glide, and a new config mid-glide.
LIVE_CHANGES = {2: (0, {"prompt": "a cat", "transition_frames": 3, "feedback": 0.2}),
                3: (2, {"seed": 9, "transition_frames": 2, "guidance_scale": 6.0}),
                4: (0, {"prompt": [{"text": "a cat", "weight": 1}, {"text": "a red circle", "weight": 1}],
                        "transition_frames": 2})}


def _run_live(g, which: list[int], frames):
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True))
    states = {k: core.add(LIVE[k]) for k in which}
    got: dict[int, list] = {k: [] for k in which}
    by_id = {s.id: k for k, s in states.items()}
    for i, f in enumerate(frames):
        if i in LIVE_CHANGES and LIVE_CHANGES[i][0] in states:
            k, changes = LIVE_CHANGES[i]
            core.reconfigure(states[k].id, states[k].config.replace(**changes))
        for s in states.values():
            core.submit(s.id, Frame(image=f, seq=i))
        for o in core.step():
            got[by_id[o.stream_id]].append(o)
    for o in core.flush():
        got[by_id[o.stream_id]].append(o)
    return got, core.batch_sizes


def test_streams_with_blends_seeds_feedback_and_glides_batched_equal_each_alone(tiny_generator):
    frames = _frames(7)
    together, sizes = _run_live(tiny_generator, [0, 1, 2], frames)
    assert max(sizes) == sum(c.steps for c in LIVE)  # they really shared calls
    for k in range(len(LIVE)):
        alone, _ = _run_live(tiny_generator, [k], frames)
        assert [o.seq for o in together[k]] == [o.seq for o in alone[k]] == list(range(len(frames)))
        for a, b in zip(alone[k], together[k], strict=True):
            np.testing.assert_allclose(b.image, a.image, atol=1e-5, rtol=0)
    assert np.abs(together[0][-1].image - together[2][-1].image).max() > 1e-3


def test_streams_with_different_lora_scales_each_equal_their_solo_run(demo_lora_generator):
    """One engine, four streams: adapter scales 0, 1, 0.5 and 1 again (another seed). Calls are grouped
    by adapter set, so the two at scale 1 share calls and nothing of one style leaks into another."""
    size = 64
    base = StreamConfig(prompt="a red circle on a blue background", mode="img2img", strength=0.7, width=size,
                        height=size, guidance_scale=3.0)
    configs = [base.replace(seed=1, loras={"swap": 0.0}), base.replace(seed=2, loras={"swap": 1.0}),
               base.replace(seed=3, loras={"swap": 0.5}), base.replace(seed=4, loras={"swap": 1.0}, steps=2)]
    rs = np.random.RandomState(2)
    frames = [(rs.rand(size, size, 3) * 255).astype(np.uint8) for _ in range(3)]
    together, sizes = _run(demo_lora_generator, configs, frames)
    # Scale 1: stream 2's frame and stream 4's two frames in flight (2 steps) share one call; the
    # streams at scales 0 and 0.5 never join it (without grouping by adapter set a call would hold 5).
    assert max(sizes) == 3
    for k, cfg in enumerate(configs):
        alone, _ = _run(demo_lora_generator, [cfg], frames)
        for a, b in zip(alone[0], together[k], strict=True):
            np.testing.assert_allclose(b.image, a.image, atol=1e-5, rtol=0)
    # the adapter really changes the picture (the comparison above is not vacuous)
    plain, _ = _run(demo_lora_generator, [configs[1].replace(loras={"swap": 0.0})], frames)
    assert np.abs(plain[0][0].image - together[1][0].image).max() > 0.1
