"""Losses: flow-matching task loss, multi-level KD, timestep-aware scaling, GAN losses.

Timestep-aware scaling (SnapGen): S(L_task, L_kd) = E_t[a_t L_task + (1 - a_t) r L_kd] with
r = (|L_task| / |L_kd|) computed per sample and detached, so the KD term is rescaled to the task
loss's magnitude and only its direction (gradient) is kept.

Normalisation of a_t (our choice, documented in docs/training.md): a_t = p(t) / max_u p(u), with p
the logit-normal density of the run's timestep sampling (``flow.logit_mean``, ``flow.logit_std``),
so a_t is in (0, 1], equals 1 at the mode (t = 0.5 for mean 0, std 1: the task loss dominates in the
middle where the most samples are drawn) and falls to 0 at the ends (t -> 0 or 1: distillation
dominates, where the data loss is least informative). The maximum is found on a fixed grid of
10001 points, exact to 1e-6 for the usual std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training_tools.flow import logit_normal_density

_EPS = 1e-12


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: [B,...] x [B,...] -> [B] float32."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def task_weight(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """a_t = p(t) / max p, p the logit-normal density (see module docstring). [B] -> [B]."""
    grid = torch.linspace(1e-4, 1 - 1e-4, 10001, dtype=torch.float64)
    peak = logit_normal_density(grid, mean, std).max()
    return (logit_normal_density(t.double(), mean, std) / peak).clamp(0.0, 1.0).to(torch.float32)


def timestep_aware_scaling(l_task: torch.Tensor, l_kd: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """S = mean_b[a_b L_task_b + (1 - a_b) (|L_task_b| / |L_kd_b|).detach() L_kd_b]. [B] x3 -> scalar."""
    ratio = (l_task.abs() / l_kd.abs().clamp_min(_EPS)).detach()
    return (a_t * l_task + (1 - a_t) * ratio * l_kd).mean()


def combine(
    l_task: torch.Tensor,
    kd_terms: dict[str, tuple[torch.Tensor, float]],
    a_t: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Total loss from the task loss [B] and weighted KD terms {name: ([B], weight)}.

    ``timestep_aware``: sum_k w_k S(L_task, L_k) (with no KD terms: mean L_task);
    ``sum``: mean(L_task) + sum_k w_k mean(L_k); ``kd_only``: sum_k w_k mean(L_k).
    """
    active = {k: (v, w) for k, (v, w) in kd_terms.items() if w > 0}
    if mode == "timestep_aware":
        if not active:
            return l_task.mean()
        return sum(
            (w * timestep_aware_scaling(l_task, v, a_t) for v, w in active.values()), l_task.new_zeros(())
        )
    kd = sum((w * v.mean() for v, w in active.values()), l_task.new_zeros(()))
    return kd if mode == "kd_only" else l_task.mean() + kd


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """Grid (gh, gw) of a token sequence covering an height x width latent with the same aspect."""
    factor = math.sqrt(height * width / tokens)
    gh, gw = round(height / factor), round(width / factor)
    if gh * gw != tokens:
        raise ValueError(f"{tokens} tokens do not tile a {height}x{width} latent at one aspect ratio")
    return gh, gw


class FeatureProjector(nn.Module):
    """Learnable projector for feature-level KD with spatial alignment to the teacher's tokens.

    The student's tokens [B, Ns, Cs] (grid gs) are reshaped to an image, bilinearly resized to the
    teacher's grid gt, flattened to [B, Nt, Cs] and projected by LayerNorm + Linear to [B, Nt, Ct].
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(student_dim)
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(
        self, student: torch.Tensor, student_grid: tuple[int, int], teacher_grid: tuple[int, int]
    ) -> torch.Tensor:
        b, n, c = student.shape
        if n != student_grid[0] * student_grid[1]:
            raise ValueError(f"{n} student tokens do not match the grid {student_grid}")
        if student_grid != teacher_grid:
            image = student.transpose(1, 2).reshape(b, c, *student_grid)
            image = F.interpolate(image.float(), size=teacher_grid, mode="bilinear", align_corners=False)
            student = image.flatten(2).transpose(1, 2).to(student.dtype)
        return self.proj(self.norm(student))


def feature_kd_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between projected student tokens and teacher tokens [B,N,C] -> [B]."""
    return per_sample_mse(projected, teacher)


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Discriminator loss on logits [B] (real samples vs generated ones). Scalar."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Generator (student) adversarial loss on the discriminator's logits for its samples [B]."""
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()
