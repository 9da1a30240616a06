"""Flow matching in torch: timestep sampling, noising, velocity target, Euler sampling.

Conventions (fixed for the project): x_t = (1 - t) * x0 + t * eps, v = eps - x0, t in [0, 1];
sampling runs t: 1 -> 0 with Euler x <- x + (t_next - t) * v; timestep shift
t' = s*t / (1 + (s-1)*t); the denoiser takes timestep = t * 1000 (float32 [B]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t [B,C,h,w], t [B] in [0,1]) -> velocity [B,C,h,w]."""


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 timestep shift t' = s*t / (1 + (s-1)*t); s > 1 moves mass toward noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(latent_h: int, latent_w: int, base_latent_pixels: int = 64 * 64) -> float:
    """SD3's resolution-dependent shift: sqrt(latent pixels / base); 1.0 at the base size."""
    return math.sqrt((latent_h * latent_w) / base_latent_pixels)


def sample_t(
    batch: int, *, mean: float, std: float, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Logit-normal timesteps t = sigmoid(mean + std*n), n ~ N(0,1), then shifted. [B] float32."""
    n = torch.randn(batch, generator=generator)
    return shift_t(torch.sigmoid(mean + std * n), shift)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution at t in (0, 1) (same shape as t)."""
    t = t.clamp(1e-6, 1 - 1e-6)
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, t [B] broadcast over [B,C,h,w]."""
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tb) * x0 + tb * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v (one network evaluation gives a clean estimate)."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype) * v


def schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sampling times [steps + 1] from 1 to 0 (uniform, then shifted), float32."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift_t(t, shift)


def euler_segment(
    denoiser: Denoiser,
    x: torch.Tensor,
    t_from: torch.Tensor,
    t_to: torch.Tensor,
    steps: int,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from per-sample times t_from [B] to t_to [B] with ``steps`` uniform Euler steps.

    ``first``: the velocity at (x, t_from) when the caller already has it (one denoiser call fewer).
    """
    for i in range(steps):
        a = t_from + (t_to - t_from) * (i / steps)
        b = t_from + (t_to - t_from) * ((i + 1) / steps)
        v = first if i == 0 and first is not None else denoiser(x, a)
        x = x + (b - a).view(-1, *([1] * (x.dim() - 1))) * v
    return x


@torch.no_grad()
def euler_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
    """Euler from t=1 (noise [B,C,h,w]) to t=0; one denoiser call per step. Returns latents."""
    times = schedule(steps, shift)
    x = noise
    for i in range(steps):
        t = times[i].expand(x.shape[0])
        v = denoiser(x, t)
        x = x + (times[i + 1] - times[i]) * v
    return x
