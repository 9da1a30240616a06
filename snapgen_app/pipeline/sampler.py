"""Pure numpy flow-matching Euler sampler (k-diffusion style), 1-50 steps, SD3 timestep shift.

Convention (team brief): x_t = (1 - t) * x0 + t * eps with t in [0, 1]; the denoiser predicts the
velocity v = eps - x0; sampling walks t from 1 to 0 with x <- x + (t_next - t) * v. The x0
estimate at time t is x - t * v, which is what a preview shows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from snapgen_app.api import MAX_STEPS, MIN_STEPS
from snapgen_app.errors import ConfigError

#: ``denoiser(x, t) -> velocity``: x float32 [B, C, h, w], t a Python float in [0, 1].
Denoiser = Callable[[np.ndarray, float], np.ndarray]
#: ``callback(step, total, t, x, denoised_estimate)`` after each UNet evaluation; step is 1-based,
#: ``x`` is the state after the Euler update and ``denoised_estimate`` the x0 estimate at ``t``.
#: It may raise (e.g. ``Cancelled``) to stop sampling.
StepCallback = Callable[[int, int, float, np.ndarray, np.ndarray], None]


def shift_timesteps(t: np.ndarray, shift: float) -> np.ndarray:
    """SD3 timestep shift t' = s*t / (1 + (s-1)*t); maps [0, 1] onto [0, 1], s > 1 spends more
    steps at high noise."""
    if not shift > 0:
        raise ConfigError("shift", f"{shift} must be positive")
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_sigmas(steps: int, shift: float = 1.0) -> np.ndarray:
    """Flow times for ``steps`` Euler steps: float64 [steps + 1], from 1.0 down to exactly 0.0.

    Evenly spaced in t, then shifted. Raises ConfigError (a UsageError) for steps outside 1-50.
    """
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, np.integer))
        or not MIN_STEPS <= steps <= MAX_STEPS
    ):
        raise ConfigError("steps", f"{steps} is out of range", allowed=f"{MIN_STEPS}-{MAX_STEPS}")
    t = np.linspace(1.0, 0.0, int(steps) + 1, dtype=np.float64)
    return shift_timesteps(t, shift)


def sample_euler(
    denoiser: Denoiser,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """Integrate the flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    ``x``: float32 [B, C, h, w], the noise at t = sigmas[0] (normally pure noise at t = 1).
    ``sigmas``: decreasing flow times [steps + 1]. Returns float32 [B, C, h, w] at ``sigmas[-1]``.
    The state stays float32 throughout so results do not depend on numpy's promotion rules.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ConfigError("sigmas", f"need at least 2 flow times, got shape {sigmas.shape}")
    if np.any(np.diff(sigmas) >= 0):
        raise ConfigError("sigmas", "flow times must strictly decrease (1 -> 0)")
    total = len(sigmas) - 1
    x = np.asarray(x, dtype=np.float32)
    for i in range(total):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        velocity = np.asarray(denoiser(x, t), dtype=np.float32)
        if velocity.shape != x.shape:
            raise ValueError(f"denoiser returned shape {velocity.shape} for input {x.shape}")
        denoised = x - np.float32(t) * velocity
        x = x + np.float32(t_next - t) * velocity
        if callback is not None:
            callback(i + 1, total, t, x, denoised)
    return x
