"""The text side of training: frozen encoder outputs are cached, projections train.

:class:`TextStep` wraps a :class:`~snapgen_app.model.text_encoders.TextConditioner` as a module
whose ``forward(frozen, drop_mask)`` maps cached frozen features to the UNet's context
(``TextConditioner.project``), so Accelerate/DDP can wrap it like any trainable module. Cached
features are a flat dict: ``tokens.{i}`` [B, L_i, H_i] and ``pooled.{i}`` [B, P_i] per encoder i.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from snapgen_app.config import TextConditionerConfig, TextEncoderConfig, UNetConfig
from snapgen_app.model.text_encoders import TextConditioner, TextProjection

Encoded = tuple[torch.Tensor, torch.Tensor]


def default_conditioner_config(unet: UNetConfig, max_length: int, dropout: float) -> TextConditionerConfig:
    """One MiniLM encoder projected to the UNet's context width (and pooled size, when it has one)."""
    return TextConditionerConfig(
        encoders=(TextEncoderConfig(max_length=max_length),),
        context_dim=unet.context_dim,
        pooled_projection_dim=unet.pooled_dim,
        dropout=(dropout,),
    )


class TextStep(nn.Module):
    """Trainable projections over cached frozen text features (see module docstring)."""

    def __init__(self, conditioner: TextConditioner) -> None:
        super().__init__()
        self.conditioner = conditioner
        conditioner.encoders.requires_grad_(False)

    @property
    def num_encoders(self) -> int:
        return len(self.conditioner.encoders)

    @property
    def config(self) -> TextConditionerConfig:
        return self.conditioner.config

    @property
    def fingerprint(self) -> str:
        """Identifies the frozen encoders (what the text cache depends on)."""
        return hashlib.sha256(repr(self.conditioner.config.encoders).encode()).hexdigest()[:16]

    def sample_drop_mask(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Bool [B, encoders], True = dropped (independent per encoder)."""
        return self.conditioner.sample_drop_mask(batch, generator)

    @torch.no_grad()
    def encode_frozen(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> cacheable frozen features {tokens.i, pooled.i}."""
        out: dict[str, torch.Tensor] = {}
        for i, (tokens, pooled) in enumerate(self.conditioner.encode_frozen(list(captions))):
            out[f"tokens.{i}"] = tokens.float()
            out[f"pooled.{i}"] = pooled.float()
        return out

    def forward(self, frozen: dict[str, torch.Tensor], drop_mask: torch.Tensor | None = None) -> Encoded:
        """Cached features -> (tokens [B, L, context_dim], pooled [B, pooled_dim]) float32."""
        parts = [(frozen[f"tokens.{i}"], frozen[f"pooled.{i}"]) for i in range(self.num_encoders)]
        return self.conditioner.project(parts, drop_mask)

    def encode(self, prompts: Sequence[str], drop_all: bool = False) -> Encoded:
        """Prompts -> projected (tokens, pooled); ``drop_all`` gives the unconditional input."""
        frozen = self.encode_frozen(prompts)
        device = next(self.conditioner.projection.parameters()).device
        frozen = {k: v.to(device) for k, v in frozen.items()}
        mask = torch.ones(len(prompts), self.num_encoders, dtype=torch.bool) if drop_all else None
        return self(frozen, mask)

    def frozen_copy(self) -> TextStep:
        """Same frozen encoders, a frozen copy of the current projections (the teacher's text view)."""
        projection = copy.deepcopy(self.conditioner.projection).requires_grad_(False).eval()
        conditioner = TextConditioner(
            self.conditioner.config, encoders=list(self.conditioner.encoders), projection=projection
        )
        return TextStep(conditioner).eval()

    def save_projection(self, directory: Path) -> None:
        """The trainable projections as a diffusers component (config.json + safetensors)."""
        self.conditioner.save_pretrained(directory)


def build_text_step(unet: UNetConfig, text_path: str, max_length: int, dropout: float) -> TextStep:
    """Load the saved projections at ``text_path`` or build fresh ones over MiniLM."""
    if text_path:
        return TextStep(TextConditioner.from_pretrained(text_path))
    config = default_conditioner_config(unet, max_length, dropout)
    return TextStep(TextConditioner(config, projection=TextProjection.from_conditioner_config(config)))
