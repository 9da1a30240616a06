"""Step distillation's pieces: the backward simulation (each sample's own k Euler steps of the
student), the teacher's targets in fewer calls, and the discriminator's reuse of the fake features."""

from __future__ import annotations

import torch

from snapgen_app.model.presets import unet_preset
from snapgen_app.model.unet import SnapGenUNet
from training_tools import flow
from training_tools.teachers import SnapGenTeacher
from training_tools.trainer import simulate_chains, trajectory_targets


def _masked_reference(model, x, times, k, tokens, pooled):  # type: ignore[no-untyped-def]
    """The whole batch to max(k), later steps masked out (what the trainer did before)."""
    for j in range(int(k.max())):
        v = model(x, times[j].expand(x.shape[0]) * 1000, tokens, pooled).float()
        x = torch.where((k > j).view(-1, 1, 1, 1), x + (times[j + 1] - times[j]) * v, x)
    return x


def test_only_unfinished_chains_run_and_the_result_matches_the_masked_batch() -> None:
    torch.manual_seed(0)
    model = SnapGenUNet.from_unet_config(unet_preset("tiny")).eval()
    cfg = model.unet_config
    b = 6
    x = torch.randn(b, cfg.in_channels, 8, 8)
    tokens = torch.randn(b, 5, cfg.context_dim)
    pooled = torch.randn(b, cfg.pooled_dim)
    times = flow.schedule(4, 3.0)
    k = torch.tensor([0, 3, 1, 2, 3, 0])
    calls: list[int] = []

    def counting(xx, tt, cc, pp):  # type: ignore[no-untyped-def]
        calls.append(xx.shape[0])
        return model(xx, tt, cc, pp)

    with torch.no_grad():
        got = simulate_chains(counting, x, times, k, tokens, pooled)
        want = _masked_reference(model, x, times, k, tokens, pooled)
    assert calls == [4, 3, 2]  # samples with k > 0, > 1, > 2: 9 sample-passes instead of 18
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[k == 0], x[k == 0])  # a chain of no steps stays at the fresh noise


def _tiny_inputs(b: int = 4):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = SnapGenUNet.from_unet_config(unet_preset("tiny")).eval()
    cfg = model.unet_config
    tokens = torch.randn(b, 5, cfg.context_dim)
    pooled = torch.randn(b, cfg.pooled_dim)
    return model, tokens, pooled, torch.randn(b, cfg.in_channels, 8, 8), torch.randn(b, cfg.in_channels, 8, 8)


def test_euler_segment_with_a_given_first_velocity_equals_calling_the_denoiser() -> None:
    model, tokens, pooled, x, _ = _tiny_inputs()
    t_from, t_to = torch.tensor([0.9, 0.8, 0.6, 0.3]), torch.tensor([0.7, 0.5, 0.4, 0.0])

    def velocity(xx, tt):  # type: ignore[no-untyped-def]
        return model(xx, tt * 1000, tokens, pooled)

    with torch.no_grad():
        plain = flow.euler_segment(velocity, x, t_from, t_to, 3)
        given = flow.euler_segment(velocity, x, t_from, t_to, 3, first=velocity(x, t_from))
    assert torch.equal(plain, given)


def test_trajectory_targets_take_the_data_target_from_the_first_call() -> None:
    """The batched call gives what separate calls give (the Euler path as a velocity and the teacher's
    velocity at the data-noised point), with ``sub`` teacher calls instead of ``sub + 1``."""
    model, tokens, pooled, x_sim, x_data = _tiny_inputs()
    t, t_next = torch.tensor([1.0, 0.9, 0.75, 0.5]), torch.tensor([0.9, 0.75, 0.5, 0.0])
    calls: list[int] = []

    def velocity(xx, tt):  # type: ignore[no-untyped-def]
        calls.append(xx.shape[0])
        copies = xx.shape[0] // tokens.shape[0]
        return 2.0 * model(xx, tt * 1000, tokens.repeat(copies, 1, 1), pooled.repeat(copies, 1))

    with torch.no_grad():
        v_target, data_target = trajectory_targets(velocity, x_sim, x_data, t, t_next, 2, with_data=True)
        assert calls == [8, 4]  # the first sub-step on both batches, the second on the trajectory
        calls.clear()
        x_next = flow.euler_segment(velocity, x_sim, t, t_next, 2)
        want_target = (x_next - x_sim) / (t_next - t).view(-1, 1, 1, 1)
        want_data = velocity(x_data, t)
        assert calls == [4, 4, 4]  # what it took before
        only_path, none = trajectory_targets(velocity, x_sim, x_data, t, t_next, 2, with_data=False)
    assert data_target is not None and none is None
    torch.testing.assert_close(v_target, want_target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data_target, want_data, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only_path, want_target, rtol=1e-5, atol=1e-5)


def test_the_fake_features_of_the_generator_pass_are_what_the_discriminator_step_would_recompute() -> None:
    """The discriminator step reuses the teacher's features of the (detached) fake samples from the
    generator's pass, which ran with gradients to the input: they equal a fresh pass without them."""
    model, tokens, pooled, x, _ = _tiny_inputs()
    teacher = SnapGenTeacher(model)
    s = torch.tensor([0.2, 0.5, 0.7, 0.95])
    x_grad = x.clone().requires_grad_(True)
    kept = [(f.detach().float(), g) for f, g in teacher(x_grad, s, tokens, pooled)[1]]
    with torch.no_grad():
        fresh = teacher(x, s, tokens, pooled)[1]
    assert len(kept) == len(fresh) >= 3
    for (a, grid_a), (b, grid_b) in zip(kept, fresh, strict=True):
        assert grid_a == grid_b
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
