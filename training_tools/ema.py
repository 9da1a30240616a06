"""Exponential moving average of a model's trainable parameters (kept in float32)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of the trainable parameters: shadow <- d * shadow + (1 - d) * param.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates (as in diffusers'
    EMAModel), so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        """Decay used by the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current trainable parameters into the average."""
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.mul_(d).add_(params[name].detach().float(), alpha=1 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (same parameter names)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow.to(params[name].dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save (names are the parameter names)."""
        return {name: t.contiguous() for name, t in self.shadow.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        """Restore a saved average; the parameter names must match exactly."""
        missing = set(self.shadow) ^ set(tensors)
        if missing:
            raise KeyError(f"EMA checkpoint does not match the model: {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(tensors[name])
        self.updates = updates
