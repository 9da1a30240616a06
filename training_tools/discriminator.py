"""Diffusion-GAN discriminator: trainable heads on the frozen teacher's intermediate features.

The teacher sees a re-noised sample (x0 -> x_s at a fresh time s) and its features at a few layers
(tokens [B, N, C]) go through one small head each (LayerNorm -> Linear -> SiLU -> Linear to one logit
per token); the logit of a sample is the mean over tokens and heads. Only the heads train; the
teacher stays frozen, but gradients flow through it to the generated sample for the student's loss.
"""

from __future__ import annotations

import torch
from torch import nn

from training_tools.teachers import Feature


class FeatureHead(nn.Module):
    """Per-token logit from one feature map: [B, N, C] -> [B]."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.float()).squeeze(-1).mean(1)


class FeatureDiscriminator(nn.Module):
    """One :class:`FeatureHead` per teacher feature; logits averaged over heads. [B] float32."""

    def __init__(self, channels: list[int], hidden: int = 64) -> None:
        super().__init__()
        self.heads = nn.ModuleList(FeatureHead(c, hidden) for c in channels)

    def forward(self, features: list[Feature]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator built for {len(self.heads)} features, got {len(features)}")
        return torch.stack(
            [head(tokens) for head, (tokens, _) in zip(self.heads, features, strict=True)]
        ).mean(0)
