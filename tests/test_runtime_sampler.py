"""The numpy flow-matching Euler sampler: schedule, exactness on straight paths, step limits."""

from __future__ import annotations

import numpy as np
import pytest

from snapgen_app.errors import Cancelled, ConfigError, UsageError
from snapgen_app.pipeline.sampler import flow_sigmas, sample_euler, shift_timesteps


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
    return x0, eps


def test_sigmas_without_shift_are_even_from_one_to_zero() -> None:
    sigmas = flow_sigmas(4, shift=1.0)
    np.testing.assert_allclose(sigmas, [1.0, 0.75, 0.5, 0.25, 0.0])
    assert sigmas.dtype == np.float64


def test_sigmas_follow_the_sd3_shift_formula() -> None:
    s = 3.0
    t = np.linspace(1.0, 0.0, 5)
    expected = s * t / (1 + (s - 1) * t)
    sigmas = flow_sigmas(4, shift=s)
    np.testing.assert_allclose(sigmas, expected, rtol=0, atol=1e-15)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert np.all(sigmas[1:-1] > t[1:-1]), "shift > 1 must move every inner step towards more noise"
    np.testing.assert_allclose(shift_timesteps(np.array([0.5]), 3.0), [0.75])


@pytest.mark.parametrize("steps", [1, 2, 50])
def test_allowed_step_counts(steps: int) -> None:
    sigmas = flow_sigmas(steps, shift=2.0)
    assert sigmas.shape == (steps + 1,)
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("steps", [0, 51, -1, True])
def test_out_of_range_steps_are_rejected(steps: int) -> None:
    with pytest.raises(ConfigError, match="steps") as info:
        flow_sigmas(steps)
    assert isinstance(info.value, UsageError)
    assert "1-50" in str(info.value)


def test_bad_shift_is_rejected() -> None:
    with pytest.raises(ConfigError, match="shift"):
        flow_sigmas(4, shift=0.0)


def test_one_step_with_the_exact_velocity_reaches_x0() -> None:
    x0, eps = _pair()
    result = sample_euler(lambda x, t: eps - x0, eps.copy(), flow_sigmas(1))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, x0, atol=1e-6)


@pytest.mark.parametrize(("steps", "shift"), [(4, 1.0), (7, 3.0), (50, 2.5)])
def test_straight_path_is_integrated_exactly_for_any_schedule(steps: int, shift: float) -> None:
    x0, eps = _pair(1)
    calls: list[float] = []

    def denoiser(x: np.ndarray, t: float) -> np.ndarray:
        calls.append(t)
        # on the straight path x_t = (1-t) x0 + t eps the true velocity is constant
        np.testing.assert_allclose(x, (1 - t) * x0 + t * eps, atol=2e-5)
        return eps - x0

    result = sample_euler(denoiser, eps.copy(), flow_sigmas(steps, shift))
    assert len(calls) == steps
    np.testing.assert_allclose(result, x0, atol=2e-5)


def test_callback_sees_every_step_with_the_x0_estimate() -> None:
    x0, eps = _pair(2)
    sigmas = flow_sigmas(5, 3.0)
    seen: list[tuple[int, int, float]] = []

    def callback(step: int, total: int, t: float, x: np.ndarray, denoised: np.ndarray) -> None:
        seen.append((step, total, t))
        np.testing.assert_allclose(denoised, x0, atol=2e-5)
        assert x.shape == x0.shape

    sample_euler(lambda x, t: eps - x0, eps.copy(), sigmas, callback)
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    assert {s[1] for s in seen} == {5}
    np.testing.assert_allclose([s[2] for s in seen], sigmas[:-1])


def test_a_raising_callback_stops_sampling_at_once() -> None:
    x0, eps = _pair(3)
    calls = []

    def denoiser(x: np.ndarray, t: float) -> np.ndarray:
        calls.append(t)
        return eps - x0

    def callback(step: int, total: int, t: float, x: np.ndarray, denoised: np.ndarray) -> None:
        if step == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        sample_euler(denoiser, eps.copy(), flow_sigmas(10), callback)
    assert len(calls) == 2


def test_sigmas_must_decrease() -> None:
    _x0, eps = _pair()
    with pytest.raises(ConfigError, match="decrease"):
        sample_euler(lambda x, t: eps, eps, np.array([0.0, 1.0]))


def test_velocity_of_the_wrong_shape_is_an_error() -> None:
    _, eps = _pair()
    with pytest.raises(ValueError, match="shape"):
        sample_euler(lambda x, t: x[:1], eps, flow_sigmas(2))
