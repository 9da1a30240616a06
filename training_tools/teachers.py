"""Teacher adapters: one small interface over SnapGen UNets and diffusers denoisers.

A :class:`Teacher` is a frozen denoiser answering ``(x_t, t, tokens, pooled)`` with the velocity and
a list of intermediate features as tokens [B, N, C] with their grid (gh, gw):

* ``features[-1]`` is the feature-level KD target (the last transformer tokens at the lowest
  resolution, as the student's ``kd_tokens``);
* all of them feed the discriminator heads of adversarial step distillation.

Adapters: :class:`SnapGenTeacher` (``SnapGenUNet``), :class:`UNet2DTeacher` (diffusers
``UNet2DConditionModel``: SD1.x/SDXL-style) and :class:`SD3Teacher` (diffusers
``SD3Transformer2DModel``; the paper's teacher is SD3.5-Large). Features of the diffusers models are
collected with forward hooks, so no diffusers code is copied or patched. Every teacher reads the
student's (projected) text tokens, so its cross-attention width must equal the student's context width.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from snapgen_app.errors import TrainingError

Feature = tuple[torch.Tensor, tuple[int, int]]
"""Tokens [B, N, C] and their grid (gh, gw)."""


def _as_tokens(value: torch.Tensor) -> Feature:
    """[B,C,h,w] -> ([B,h*w,C], (h,w))."""
    h, w = value.shape[-2:]
    return value.flatten(2).transpose(1, 2), (h, w)


class Teacher(nn.Module):
    """Frozen denoiser with features. Subclasses set the attributes below and implement ``run``."""

    latent_channels: int
    context_dim: int
    pooled_dim: int
    name: str = "teacher"

    def __init__(self, model: nn.Module, feature_layers: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.feature_layers = max(1, feature_layers)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Feature]]:
        """x_t [B,C,h,w], t [B] in [0,1] -> (velocity [B,C,h,w], features); gradients flow to x_t."""
        return self.run(x_t, t * 1000.0, tokens, pooled)

    def run(
        self, x_t: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Feature]]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Teacher:
        """The teacher always stays in eval mode (no dropout, frozen norms)."""
        return super().train(False)

    def check_student(self, latent_channels: int, context_dim: int, pooled_dim: int) -> None:
        """Raise a TrainingError naming the mismatch when the student and teacher cannot be paired."""
        if latent_channels != self.latent_channels:
            raise TrainingError(
                f"teacher ({self.name}) works in a {self.latent_channels}-channel latent space but the student in a "
                f"{latent_channels}-channel one: their latent spaces are incompatible",
                hint="distill from a teacher that uses the same autoencoder latent space (SnapGen: 16 channels, 8x)",
            )
        if context_dim != self.context_dim:
            raise TrainingError(
                f"teacher ({self.name}) cross-attends to {self.context_dim}-wide text tokens, the student's text "
                f"conditioner gives {context_dim}",
                hint="build the student's text conditioner with context_dim equal to the teacher's",
            )
        if self.pooled_dim and pooled_dim != self.pooled_dim:
            raise TrainingError(
                f"teacher ({self.name}) takes a pooled text vector of {self.pooled_dim} features, the student "
                f"gives {pooled_dim}",
                hint="match the text conditioner's pooled size to the teacher",
            )


class SnapGenTeacher(Teacher):
    """A SnapGenUNet as teacher (e.g. the base model when fine-tuning or step-distilling)."""

    name = "snapgen"

    def __init__(self, model: nn.Module, feature_layers: int = 3) -> None:
        super().__init__(model, feature_layers)
        cfg = model.unet_config  # type: ignore[attr-defined]
        self.latent_channels = cfg.in_channels
        self.context_dim = cfg.context_dim
        self.pooled_dim = cfg.pooled_dim
        stages = cfg.num_stages
        self._keys = [f"down_{stages - 1}", "mid", f"up_{stages - 1}"][: self.feature_layers]

    def run(
        self, x_t: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Feature]]:
        velocity, feats = self.model(
            x_t, timestep, tokens, pooled if self.pooled_dim else None, return_features=True
        )
        out = [_as_tokens(feats[k]) for k in self._keys if k in feats]
        if "kd_tokens" in feats:
            grid = _as_tokens(feats["mid"])[1]
            out.append((feats["kd_tokens"], grid))
        return velocity, out


class _HookedTeacher(Teacher):
    """Collects outputs of chosen submodules with forward hooks during each call."""

    def __init__(self, model: nn.Module, feature_layers: int, modules: Iterable[nn.Module]) -> None:
        super().__init__(model, feature_layers)
        self._captured: list[torch.Tensor] = []
        for module in modules:
            module.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: object, output: object) -> None:
        value = output
        if isinstance(value, tuple):  # diffusers blocks return (hidden, ...) or (context, hidden)
            tensors = [v for v in value if torch.is_tensor(v)]
            value = tensors[-1] if self._take_last else tensors[0]
        elif hasattr(value, "sample"):
            value = value.sample  # type: ignore[union-attr]
        self._captured.append(value)  # type: ignore[arg-type]

    _take_last = False


class UNet2DTeacher(_HookedTeacher):
    """diffusers ``UNet2DConditionModel``: features = outputs of the last down blocks and the mid block."""

    name = "unet2d"

    def __init__(self, model: nn.Module, feature_layers: int = 3) -> None:
        blocks = [*model.down_blocks, model.mid_block]  # type: ignore[attr-defined]
        chosen = blocks[-max(1, feature_layers) :]
        super().__init__(model, feature_layers, chosen)
        cfg = model.config  # type: ignore[attr-defined]
        self.latent_channels = int(cfg.in_channels)
        cross = cfg.cross_attention_dim
        self.context_dim = int(cross if isinstance(cross, int) else cross[0])
        self._sdxl = cfg.addition_embed_type == "text_time"
        self.pooled_dim = (
            int(cfg.projection_class_embeddings_input_dim or 0) - 6 * int(cfg.addition_time_embed_dim or 0)
            if self._sdxl
            else 0
        )

    def run(
        self, x_t: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Feature]]:
        self._captured = []
        added = None
        if self._sdxl:
            # SDXL micro-conditioning: original size, crop (0, 0), target size, all = the latent's pixel size.
            h, w = x_t.shape[-2] * 8, x_t.shape[-1] * 8
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=x_t.dtype, device=x_t.device).expand(
                x_t.shape[0], 6
            )
            added = {"text_embeds": pooled, "time_ids": time_ids}
        velocity = self.model(x_t, timestep, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        return velocity, [_as_tokens(v) for v in self._captured]


class SD3Teacher(_HookedTeacher):
    """diffusers ``SD3Transformer2DModel``: features = image tokens after the last transformer blocks."""

    name = "sd3"
    _take_last = True

    def __init__(self, model: nn.Module, feature_layers: int = 3) -> None:
        blocks = list(model.transformer_blocks)  # type: ignore[attr-defined]
        super().__init__(model, feature_layers, blocks[-max(1, feature_layers) :])
        cfg = model.config  # type: ignore[attr-defined]
        self.latent_channels = int(cfg.in_channels)
        self.context_dim = int(cfg.joint_attention_dim)
        self.pooled_dim = int(cfg.pooled_projection_dim)
        self.patch = int(cfg.patch_size)

    def run(
        self, x_t: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Feature]]:
        self._captured = []
        if pooled is None:
            pooled = x_t.new_zeros(x_t.shape[0], self.pooled_dim)
        velocity = self.model(
            hidden_states=x_t, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=timestep
        ).sample
        grid = (x_t.shape[-2] // self.patch, x_t.shape[-1] // self.patch)
        return velocity, [(v, grid) for v in self._captured]


def load_teacher(kind: str, path: str | Path, feature_layers: int = 3) -> Teacher:
    """Load a diffusers-layout teacher directory (safetensors only) and wrap it in its adapter."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise TrainingError(
            f"teacher directory {folder} has no config.json",
            hint="give the folder of one diffusers component (config.json + diffusion_pytorch_model.safetensors)",
        )
    if not any(folder.glob("*.safetensors")):
        raise TrainingError(
            f"teacher directory {folder} has no .safetensors weights", hint="pickle weights are refused"
        )
    if kind == "snapgen":
        from snapgen_app.model.unet import SnapGenUNet

        return SnapGenTeacher(SnapGenUNet.from_pretrained(folder, use_safetensors=True), feature_layers)
    if kind == "unet2d":
        from diffusers import UNet2DConditionModel

        return UNet2DTeacher(
            UNet2DConditionModel.from_pretrained(folder, use_safetensors=True), feature_layers
        )
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Teacher(SD3Transformer2DModel.from_pretrained(folder, use_safetensors=True), feature_layers)
    raise TrainingError(f"unknown teacher kind {kind!r}", hint="allowed: snapgen, unet2d, sd3")
