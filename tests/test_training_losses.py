"""Flow-matching helpers, timestep-aware scaling on known numbers, KD projector, GAN losses."""

from __future__ import annotations

import math

import pytest
import torch

from training_tools import flow, losses


def test_task_weight_is_the_normalised_logit_normal_density() -> None:
    t = torch.tensor([0.5, 0.25, 0.9])
    a = losses.task_weight(t)

    # p(t) / p(0.5) for the standard logit-normal, written out by hand.
    def p(x: float) -> float:
        logit = math.log(x / (1 - x))
        return math.exp(-(logit**2) / 2) / (math.sqrt(2 * math.pi) * x * (1 - x))

    expected = [p(0.5) / p(0.5), p(0.25) / p(0.5), p(0.9) / p(0.5)]
    assert a.tolist() == pytest.approx(expected, abs=1e-5)
    assert expected[1] == pytest.approx(0.72919, abs=1e-4)


def test_timestep_aware_scaling_matches_the_formula_on_known_numbers() -> None:
    l_task = torch.tensor([2.0, 1.0], requires_grad=True)
    l_kd = torch.tensor([0.5, 4.0], requires_grad=True)
    a_t = torch.tensor([1.0, 0.25])
    s = losses.timestep_aware_scaling(l_task, l_kd, a_t)
    # mean(1*2 + 0*(2/0.5)*0.5, 0.25*1 + 0.75*(1/4)*4) = mean(2, 1) = 1.5
    assert float(s.detach()) == pytest.approx(1.5)
    s.backward()
    # The magnitude ratio carries no gradient: dS/dL_kd = (1-a) * ratio / B.
    assert l_kd.grad is not None and l_task.grad is not None
    assert l_kd.grad.tolist() == pytest.approx([0.0, 0.75 * 0.25 / 2])
    assert l_task.grad.tolist() == pytest.approx([0.5, 0.125])


def test_combine_modes() -> None:
    l_task = torch.tensor([1.0, 3.0])
    kd = {"out": (torch.tensor([2.0, 2.0]), 0.5)}
    a = torch.tensor([1.0, 1.0])
    assert float(losses.combine(l_task, kd, a, "sum")) == pytest.approx(2.0 + 1.0)
    assert float(losses.combine(l_task, kd, a, "kd_only")) == pytest.approx(1.0)
    assert float(losses.combine(l_task, kd, a, "timestep_aware")) == pytest.approx(0.5 * 2.0)
    assert float(losses.combine(l_task, {}, a, "timestep_aware")) == pytest.approx(2.0)


def test_feature_projector_aligns_student_tokens_to_the_teacher_grid() -> None:
    torch.manual_seed(0)
    proj = losses.FeatureProjector(8, 12)
    student = torch.randn(2, 4, 8)  # 2x2 grid
    out = proj(student, (2, 2), (4, 4))
    assert out.shape == (2, 16, 12)
    assert losses.token_grid(16, 8, 8) == (4, 4)
    assert losses.token_grid(8, 4, 8) == (2, 4)
    with pytest.raises(ValueError):
        losses.token_grid(5, 8, 8)


def test_gan_losses_on_known_logits() -> None:
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert float(losses.discriminator_loss(real, fake, "hinge")) == pytest.approx((0 + 1) / 2 + (0 + 1.5) / 2)
    assert float(losses.generator_loss(fake, "hinge")) == pytest.approx(0.75)
    ns = losses.discriminator_loss(real, fake, "non_saturating")
    expected = (math.log1p(math.exp(-2)) + math.log(2)) / 2 + (
        math.log1p(math.exp(-2)) + math.log1p(math.exp(0.5))
    ) / 2
    assert float(ns) == pytest.approx(expected, rel=1e-5)


def test_flow_conventions() -> None:
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = flow.add_noise(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    assert torch.allclose(flow.x0_from_velocity(x_t, v, t), x0, atol=1e-6)
    assert flow.shift_t(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    sched = flow.schedule(4, 1.0)
    assert sched.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert flow.resolution_shift(128, 128) == pytest.approx(2.0)
    ts = flow.sample_t(2000, mean=0.0, std=1.0, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert float(ts.min()) > 0.0 and float(ts.max()) < 1.0 and abs(float(ts.mean()) - 0.5) < 0.02
    # Euler on the exact velocity of a straight path lands on x0 in one step.
    assert torch.allclose(flow.euler_sample(lambda x, tt: v, eps, 1), x0, atol=1e-6)
