"""The TrigFlow/sCM math on its own: step lists and algebraic identities."""

from __future__ import annotations

import math

import pytest
import torch
from ditstream.engine import sampler


def test_txt2img_step_lists_follow_design():
    assert sampler.txt2img_angles(1).tolist() == pytest.approx([math.pi / 2])
    assert sampler.txt2img_angles(2).tolist() == pytest.approx([math.pi / 2, 1.3])
    assert sampler.txt2img_angles(4).tolist() == pytest.approx([math.pi / 2 * (1 - k / 4) for k in range(4)])


def test_a_model_sets_its_own_two_step_intermediate_angle():
    """``step_angles`` takes the model's intermediate angle for 2-step txt2img only."""
    assert sampler.step_angles("txt2img", 2, 1.0).tolist() == pytest.approx([math.pi / 2, 1.3])
    assert sampler.step_angles("txt2img", 2, 1.0, intermediate=0.7).tolist() == pytest.approx([math.pi / 2, 0.7])
    assert sampler.step_angles("img2img", 2, 0.5, intermediate=0.7).tolist() == pytest.approx(
        sampler.img2img_angles(2, 0.5).tolist())
    assert sampler.step_angles("txt2img", 2, 1.0, [1.5, 1.0], intermediate=0.7).tolist() == pytest.approx([1.5, 1.0])


def test_img2img_entry_angle_is_strength_times_half_pi():
    a = sampler.img2img_angles(3, 0.6)
    assert a[0].item() == pytest.approx(0.6 * math.pi / 2)
    assert a.tolist() == pytest.approx([0.6 * math.pi / 2 * (1 - k / 3) for k in range(3)])
    with pytest.raises(ValueError):
        sampler.img2img_angles(1, 0.0)


def test_perfect_prediction_recovers_clean_latent():
    """If the model predicts the exact TrigFlow velocity, one step returns the clean latent."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8) * 0.5
    eps = torch.randn(2, 4, 8, 8)
    t = torch.tensor([1.2, 0.4])
    sd = 0.5
    x = sampler.renoise(x0, t, eps, sd)
    x_in, s = sampler.model_input(x, t, sd)
    flow = (torch.cos(t).view(-1, 1, 1, 1) * sd * eps - torch.sin(t).view(-1, 1, 1, 1) * x0)
    # Invert diffusers' flow->TrigFlow conversion to find the raw output that means `flow`.
    se = s.view(-1, 1, 1, 1)
    norm = torch.sqrt(se**2 + (1 - se) ** 2)
    raw = (flow / sd * norm - (1 - 2 * se) * x_in) / (1 - 2 * se + 2 * se**2)
    got = sampler.denoised(x, x_in, raw, t, s, sd)
    torch.testing.assert_close(got, x0, atol=1e-5, rtol=1e-5)


def test_noise_is_drawn_like_diffusers_from_one_generator():
    a = sampler.draw_noise(7, (4, 2, 2), 3)
    g = torch.Generator().manual_seed(7)
    expected = torch.stack([torch.randn((4, 2, 2), generator=g) for _ in range(3)])
    assert torch.equal(a, expected)
    assert not torch.equal(a[0], a[1])
