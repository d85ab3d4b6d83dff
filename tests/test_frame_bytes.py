"""Frames cross between host and device as uint8 bytes, and the stream path's outputs are unchanged.

Every crossing goes through ``engine.images.transfer``; the tests count the bytes through it. On a CPU
the crossing is a no-op, but what passes through it is exactly what a GPU run would move. The uint8
path normalises and rounds with the same float32 operations in the same order as the float path
(``to_unit`` then ``to_uint8`` on the host, which is what the core did before), so outputs are
bit-identical, not merely close. The prompt embeddings of a call are concatenated once per batch
composition, and no tick builds a device tensor from a host list (feedback streams included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditstream.engine import images as imgs
from ditstream.engine.backends import create_backend
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.core import EngineCore
from ditstream.engine.prompt_cache import PromptCache
from ditstream.engine.types import Frame

SIZE = 32
FRAMES = 4


class Transfers:
    """Counts what crosses through ``images.transfer``: (direction, dtype, bytes) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.dtype, int]] = []

    def __call__(self, tensor: torch.Tensor, device, direction: str) -> torch.Tensor:
        self.calls.append((direction, tensor.dtype, tensor.numel() * tensor.element_size()))
        return tensor.to(device)

    def bytes(self, direction: str) -> int:
        return sum(n for d, _, n in self.calls if d == direction)


@pytest.fixture
def transfers(monkeypatch) -> Transfers:
    t = Transfers()
    monkeypatch.setattr(imgs, "transfer", t)
    return t


def _frames(seed: int, n: int = FRAMES) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    return [(rs.rand(SIZE, SIZE, 3) * 255).astype(np.uint8) for _ in range(n)]


def _core(tiny_components, **engine) -> EngineCore:
    c = tiny_components
    return EngineCore(c, create_backend("torch", c), PromptCache(c), EngineConfig(**engine))


def _cfg(seed: int, **kw) -> StreamConfig:
    return StreamConfig(prompt=f"a red circle {seed}", mode="img2img", steps=2, strength=0.7, seed=seed,
                        width=SIZE, height=SIZE, **kw)


def _run(core: EngineCore, streams: list[tuple[StreamConfig, list[np.ndarray]]]) -> dict[str, list]:
    ids = [core.add(cfg).id for cfg, _ in streams]
    out = []
    for i in range(FRAMES):
        for sid, (_, frames) in zip(ids, streams, strict=True):
            core.submit(sid, Frame(image=frames[i], seq=i))
        out += core.step()
    out += core.flush()
    assert all(o.error is None for o in out)
    return {sid: [o.image for o in out if o.stream_id == sid] for sid in ids}


def test_each_frame_crosses_as_uint8_both_ways(tiny_components, transfers):
    core = _core(tiny_components)
    streams = [(_cfg(1), _frames(1)), (_cfg(2), _frames(2))]
    out = _run(core, streams)
    frames = sum(len(v) for v in out.values())
    assert frames == 2 * FRAMES
    pixels = SIZE * SIZE * 3
    assert {dtype for _, dtype, _ in transfers.calls} == {torch.uint8}, transfers.calls
    # One byte per channel value each way: a float32 upload or download would be four times this.
    assert transfers.bytes("up") == frames * pixels
    assert transfers.bytes("down") == frames * pixels
    assert all(img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3) for v in out.values() for img in v)


def test_uint8_outputs_are_bit_identical_to_rounding_the_float_outputs_on_the_host(tiny_components):
    streams = [(_cfg(1), _frames(1)), (_cfg(2, feedback=0.5), _frames(2))]
    as_u8 = _run(_core(tiny_components), streams)
    as_float = _run(_core(tiny_components, output_float=True), streams)
    for u8, unit in zip(as_u8.values(), as_float.values(), strict=True):
        want = np.stack([imgs.to_uint8(f) for f in unit])  # the core's host rounding before this change
        assert np.stack(unit).std() > 0.01  # real pictures, so equality is not vacuous
        np.testing.assert_array_equal(np.stack(u8), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_rounding_equals_host_rounding_including_ties(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2.4 - 1.2  # beyond [-1, 1]: clamping too
    # Exact ties of ·255 (k + 0.5)/255 land on both sides: round half to even must match numpy's.
    ties = ((torch.arange(64, dtype=torch.float32) + 0.5) / 255 * 2 - 1).view(1, 1, 8, 8).expand(3, 3, 8, 8)
    for images in (x.to(dtype), ties.to(dtype)):
        want = imgs.to_uint8(imgs.to_unit(images))
        got = imgs.to_host_uint8(images)
        assert got.flags["C_CONTIGUOUS"] and got.shape == (3, 8, 8, 3)
        np.testing.assert_array_equal(got, want)


def test_to_tensor_on_the_device_equals_the_host_normalisation():
    frames = [*_frames(5, 3), np.ascontiguousarray(_frames(6, 1)[0][::-1])]
    want = torch.from_numpy(np.stack(frames).astype(np.float32))
    want = (want / np.float32(255.0)).permute(0, 3, 1, 2).mul(2.0).sub(1.0)  # the host arithmetic it replaces
    assert torch.equal(imgs.to_tensor(frames, torch.device("cpu")), want)
    assert torch.equal(imgs.to_tensor(frames[3:], torch.device("cpu")), want[3:])
    flipped = _frames(7, 1)[0][::-1]  # a negative-stride view is taken as it is
    assert torch.equal(imgs.to_tensor([flipped], torch.device("cpu"))[0],
                       imgs.to_tensor([flipped.copy()], torch.device("cpu"))[0])


def test_embeddings_are_concatenated_once_per_batch_composition(tiny_components, monkeypatch):
    core = _core(tiny_components)
    streams = [(_cfg(1), _frames(1)), (_cfg(2, feedback=0.5), _frames(2))]
    ids = [core.add(cfg).id for cfg, _ in streams]
    made: list = []
    real = torch.tensor

    def counting_tensor(*a, **k):
        made.append(a)
        return real(*a, **k)

    for i in range(FRAMES):
        if i == 2:  # steady state: both streams, both stages, feedback latents already fed back
            builds = core.conditioning.builds
            monkeypatch.setattr(torch, "tensor", counting_tensor)
        for sid, (_, frames) in zip(ids, streams, strict=True):
            core.submit(sid, Frame(image=frames[i], seq=i))
        core.step()
    monkeypatch.setattr(torch, "tensor", real)
    assert core.conditioning.builds == builds, "the same composition was concatenated again"
    assert made == [], f"a tick built a tensor from host values: {made}"
    core.reconfigure(ids[0], _cfg(9))  # a new plan: a new composition, built once
    for i in range(2):
        for sid, (_, frames) in zip(ids, streams, strict=True):
            core.submit(sid, Frame(image=frames[i], seq=FRAMES + i))
        core.step()
    assert core.conditioning.builds > builds
