"""Image ↔ tensor conversions: diffusers' arithmetic exactly, every uint8 level back to itself, inputs untouched."""

from __future__ import annotations

import numpy as np
import torch
from ditstream.engine.images import to_tensor, to_uint8, to_unit

LEVELS = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)


def test_to_tensor_is_diffusers_normalisation_bit_for_bit():
    images = [LEVELS, LEVELS[::-1].copy()]
    want = 2.0 * (torch.from_numpy(np.stack(images).astype(np.float32)) / 255.0) - 1.0  # VaeImageProcessor
    got = to_tensor(images, torch.device("cpu"))
    assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float32
    assert torch.equal(got, want.permute(0, 3, 1, 2))


def test_every_level_survives_the_round_trip_and_inputs_are_left_alone():
    x = to_tensor([LEVELS], torch.device("cpu"))
    before = x.clone()
    unit = to_unit(x)
    assert torch.equal(x, before)  # the decoder's output is not modified in place
    unit_before = unit.clone()
    np.testing.assert_array_equal(to_uint8(unit)[0], LEVELS)
    assert torch.equal(unit, unit_before)
    wide = to_unit(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert wide[0, 0, :, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]  # clamped to [0, 1]
