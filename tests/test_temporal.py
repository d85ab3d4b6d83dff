"""Attention memory across frames (``temporal``): exact when off, exact on a still input, per stream in one batch."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from ditstream.engine.backends import create_backend
from ditstream.engine.config import EngineConfig, FilterConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.errors import ValidationError
from ditstream.engine.generate import Generator
from ditstream.engine.types import Frame
from testkit import run_streams

SIZE = 32


def _cfg(**kw) -> StreamConfig:
    base = {"prompt": "a red circle", "mode": "img2img", "steps": 1, "strength": 0.7, "seed": 3,
            "width": SIZE, "height": SIZE}
    return StreamConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def torch_gen(tiny_components):
    """The tiny model with a second transformer block (its first, copied, weights scaled by 1 ± 20 %
    at random): the memory is kept per block, and the tiny model's single block could not tell a
    block read or written in another's place."""
    import torch

    transformer = copy.deepcopy(tiny_components.transformer)  # the copy gets diffusers' processors back
    extra = copy.deepcopy(transformer.transformer_blocks[0])
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in extra.parameters():
            p.mul_(1 + 0.2 * (2 * torch.rand(p.shape, generator=rng) - 1))
    transformer.transformer_blocks.append(extra)
    components = dataclasses.replace(tiny_components, transformer=transformer)
    return Generator(components, create_backend("torch", components))


@pytest.fixture(scope="module")
def compile_gen(torch_gen):
    """The same two-block model through ``torch.compile`` (its memory carried as graph inputs/outputs)."""
    return Generator(torch_gen.components, create_backend("compile", torch_gen.components))


def _run(g, configs, frames, max_batch=16):
    """Each config as one stream of one engine, fed ``frames``; returns each stream's float images."""
    core = EngineCore(g.components, g.backend, g.prompts, EngineConfig(output_float=True, max_batch=max_batch))
    return [[o.image for o in outs] for outs in run_streams(core, configs, frames, fit=_fit)]


def _moving(n, seed=1):
    rs = np.random.RandomState(seed)
    base = (rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    return [np.roll(base, 3 * k, axis=1) for k in range(n)]


def _fit(frame: np.ndarray, cfg: StreamConfig) -> np.ndarray:
    """The frame at the stream's size (a 2x stream gets each pixel repeated)."""
    k = cfg.width // frame.shape[1]
    return frame.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else frame


def _diff(a, b) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)))


def test_temporal_zero_is_bit_identical_to_a_stream_without_it(torch_gen):
    frames = _moving(4)
    plain = _run(torch_gen, [_cfg(), _cfg(seed=4)], frames)
    # temporal 0 (other decay and motion switch set) beside a stream with memory in the same calls
    mixed = _run(torch_gen, [_cfg(temporal=0.0, temporal_decay=0.9), _cfg(seed=4, temporal=0.9)], frames)
    for a, b in zip(plain[0], mixed[0], strict=True):
        np.testing.assert_array_equal(b, a)
    assert _diff(plain[1], mixed[1]) > 1e-3  # the neighbour's memory really acted in those calls


def test_still_noiseless_input_gives_the_same_frames_with_memory_on_and_off(torch_gen):
    still = _moving(1)[0]
    frames = [still] * 5
    for steps in (1, 2):
        off, on, on_half = _run(torch_gen, [_cfg(steps=steps), _cfg(steps=steps, temporal=1.0, temporal_decay=0.9),
                                            _cfg(steps=steps, temporal=0.5, temporal_decay=0.0)], frames)
        # own + w·M with M == own normalises like own: equal up to float rounding (fp32, images in [0, 1])
        assert _diff(off, on) < 1e-5 and _diff(off, on_half) < 1e-5
    moving = _run(torch_gen, [_cfg(), _cfg(temporal=1.0, temporal_decay=0.9)], _moving(5))
    assert _diff(*moving) > 1e-3  # while a moving input's frames do change with the memory


@pytest.mark.parametrize("steps", [1, 2])
def test_three_streams_off_half_and_most_and_a_fourth_each_equal_their_solo_run(torch_gen, steps):
    frames = _moving(5)
    configs = [_cfg(steps=steps), _cfg(steps=steps, temporal=0.5, seed=5), _cfg(steps=steps, temporal=0.9, seed=6),
               # and one more of another size (its own calls) with a prompt and seed blend and its own decay
               _cfg(steps=steps, temporal=0.7, temporal_decay=0.2, width=2 * SIZE, height=2 * SIZE,
                    prompt=[{"text": "a cat", "weight": 1}, {"text": "a dog", "weight": 2}],
                    seed=[{"seed": 1, "weight": 1}, {"seed": 2, "weight": 1}])]
    together = _run(torch_gen, configs, frames)
    for k, cfg in enumerate(configs):
        alone = _run(torch_gen, [cfg], frames)[0]
        assert len(alone) == len(together[k]) == len(frames)
        assert _diff(alone, together[k]) < 1e-5
    plain = _run(torch_gen, [dataclasses.replace(configs[2], temporal=0.0)], frames)[0]
    assert _diff(plain, together[2]) > 1e-3  # the memory is on in that stream


@pytest.mark.slow
def test_compile_carries_the_memory_as_torch_does(torch_gen, compile_gen):
    """Through the compile backend (the memory as graph inputs, the states as graph outputs) a mixed
    batch at steps 2 gives torch's frames, and its stream without memory gives, bit for bit, what the
    same batch gives with no memory anywhere (the compiled graph without memory)."""
    from ditstream.engine.temporal import temporal_refusal

    assert temporal_refusal(compile_gen.backend) is None
    frames = _moving(4)
    configs = [_cfg(steps=2), _cfg(steps=2, temporal=0.5, seed=5), _cfg(steps=2, temporal=0.9, seed=6),
               _cfg(steps=2, temporal=0.7, temporal_decay=0.2, width=2 * SIZE, height=2 * SIZE)]
    want = _run(torch_gen, configs, frames)
    got = _run(compile_gen, configs, frames)
    for k in range(len(configs)):
        assert _diff(want[k], got[k]) < 1e-4, k  # compile against torch: test_backends' tolerance
    off = _run(compile_gen, [dataclasses.replace(c, temporal=0.0) for c in configs], frames)
    np.testing.assert_array_equal(np.stack(got[0]), np.stack(off[0]))
    assert _diff(got[2], off[2]) > 1e-3  # the memory is on in that stream


def test_compile_pads_the_memory_to_its_bucket_and_warms_its_graph(torch_gen):
    """As on a GPU with CUDA graphs (batches padded to buckets; dynamo's eager backend, no inductor):
    the warm-up compiles the memory graph per bucket, as the engine will call it (no recompile after),
    and leaves no call behind, and a batch of 3 streams padded to 4 rows (memory, weights and states
    padded and sliced with them) gives torch's frames."""
    import torch
    from ditstream.engine.backends.compile_backend import CompileBackend

    backend = CompileBackend(torch_gen.components, compile_backend="eager", pad_to_buckets=True)
    backend.warmup([(3, SIZE, SIZE)])
    assert backend._bucket(3) == 4 and backend.temporal_attention().current is None
    padded = Generator(torch_gen.components, backend)
    configs = [_cfg(), _cfg(temporal=0.5, seed=5), _cfg(temporal=0.9, temporal_decay=0.2, seed=6)]
    frames = _moving(4)
    with torch._dynamo.config.patch(error_on_recompile=True):  # what the warm-up compiled is what runs
        got = _run(padded, configs, frames)
    assert all(image is not None for stream in got for image in stream), "a call failed: the log says why"
    want = _run(torch_gen, configs, frames)
    for k in range(len(configs)):
        assert _diff(want[k], got[k]) < 1e-5, k


def test_memory_is_per_slot_and_block_and_reset_on_a_jump_not_a_glide(torch_gen):
    core = EngineCore(torch_gen.components, torch_gen.backend, torch_gen.prompts, EngineConfig(output_float=True))
    s = core.add(_cfg(steps=2, temporal=0.5))
    for i, f in enumerate(_moving(3)):
        core.submit(s.id, Frame(image=f, seq=i))
        core.step()
    core.flush()
    blocks = len(torch_gen.components.transformer.transformer_blocks)
    assert sorted(s.memory.slots) == [0, 1] and all(v.shape[0] == blocks for v in s.memory.slots.values())
    epoch = s.memory.epoch
    core.reconfigure(s.id, _cfg(steps=2, temporal=0.5, prompt="a blue square", transition_frames=3))
    assert s.memory.epoch == epoch and s.memory.slots  # a glide keeps the memory
    core.reconfigure(s.id, _cfg(steps=2, temporal=0.5, prompt="a green cat"))
    assert s.memory.epoch == epoch + 1 and not s.memory.slots  # a jump to a new prompt drops it
    core.submit(s.id, Frame(image=_moving(1)[0], seq=9))
    core.flush()
    assert s.memory.slots
    core.reconfigure(s.id, _cfg(steps=2, temporal=0.5, prompt="a green cat", width=64, height=64))
    assert not s.memory.slots  # a size change drops it


def test_the_memory_averages_each_frames_own_state_not_the_state_it_mixed_with_memory(torch_gen):
    """Block 0's state depends on the input only (no memory reaches it before its own attention), so
    its memory after frames a, b, c with decay 0.5 must be ¼a + ¼b + ½c of the states each frame gives
    alone (a fresh stream's first frame sets the memory to its own state). Recording the mixed state
    ``own + w·M`` instead, or another block's, would not give that."""
    import torch

    def memory_after(frames):
        core = EngineCore(torch_gen.components, torch_gen.backend, torch_gen.prompts, EngineConfig(output_float=True))
        s = core.add(_cfg(temporal=1.0, temporal_decay=0.5))
        for i, f in enumerate(frames):
            core.submit(s.id, Frame(image=f, seq=i))
            core.flush()
        return s.memory.slots[0]

    frames = _moving(3)
    a, b, c = (memory_after([f]) for f in frames)
    assert float((a[0] - c[0]).abs().max()) > 1e-3  # the frames' states differ: the average is a real test
    torch.testing.assert_close(memory_after(frames)[0], 0.25 * a[0] + 0.25 * b[0] + 0.5 * c[0], rtol=1e-5, atol=1e-6)


def test_a_frame_the_similarity_filter_skips_leaves_the_memory_as_it_is(torch_gen):
    core = EngineCore(torch_gen.components, torch_gen.backend, torch_gen.prompts, EngineConfig(output_float=True))
    s = core.add(_cfg(temporal=0.5, filter=FilterConfig(enabled=True, threshold=0.5, max_skip=5, seed=0)))
    still = _moving(1)[0]
    core.submit(s.id, Frame(image=still, seq=0))
    core.flush()
    before = s.memory.slots[0].clone()
    outs = []
    for i in range(1, 4):
        core.submit(s.id, Frame(image=still, seq=i))
        outs += core.flush()
    assert all(o.skipped for o in outs)
    assert bool((before == s.memory.slots[0]).all())


def test_backends_that_cannot_carry_memory_refuse_it_by_name(tiny_components):
    g = Generator(tiny_components, create_backend("onnx", tiny_components))
    core = EngineCore(g.components, g.backend, g.prompts)
    core.add(_cfg())  # without memory it opens
    with pytest.raises(ValidationError, match="onnx backend") as err:
        core.add(_cfg(temporal=0.5))
    assert err.value.field == "temporal"
    # tensorrt too (its transformer is a built engine), by name. The refusal is the class's (its
    # ``temporal_attention`` and ``name``), so it is read off an instance built without its engine:
    # no GPU needed. (compile carries the memory: test_compile_carries_the_memory_as_torch_does.)
    from ditstream.engine.backends.tensorrt_backend import TensorRTBackend
    from ditstream.engine.temporal import temporal_refusal

    refusal = temporal_refusal(object.__new__(TensorRTBackend))
    assert refusal is not None and refusal.startswith("the tensorrt backend cannot carry attention memory")


def test_a_self_attention_that_is_not_linear_refuses_it_naming_the_processor(tiny_components):
    from diffusers.models.attention_processor import AttnProcessor2_0

    transformer = copy.deepcopy(tiny_components.transformer)
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(AttnProcessor2_0())
    components = dataclasses.replace(tiny_components, transformer=transformer)
    g = Generator(components, create_backend("torch", components))
    core = EngineCore(g.components, g.backend, g.prompts)
    with pytest.raises(ValidationError, match="AttnProcessor2_0") as err:
        core.add(_cfg(temporal=0.5))
    assert err.value.field == "temporal"


@pytest.mark.parametrize(("field", "value"), [("temporal", 1.5), ("temporal", -0.1), ("temporal_decay", 1.0),
                                              ("temporal", float("nan")), ("motion_adaptive", 1)])
def test_config_ranges_are_checked_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field) as err:
        _cfg(**{field: value}).validate(size_multiple=8)
    assert err.value.field == field


def test_a_fleet_refuses_memory_when_any_of_its_workers_does():
    from ditstream.engine.limits import EngineLimits, validate_stream

    carried, refused = EngineLimits(), EngineLimits(temporal_refusal="the onnx backend cannot carry attention memory")
    assert carried.narrowed(refused).temporal_refusal == refused.temporal_refusal
    assert carried.covers(refused) and not refused.covers(carried)
    validate_stream(_cfg(temporal=0.5), carried)
    validate_stream(_cfg(temporal=0.0), refused)
    with pytest.raises(ValidationError, match="onnx backend") as err:
        validate_stream(_cfg(temporal=0.5), refused)
    assert err.value.field == "temporal"
