"""Periodic sample images: fixed prompts and seeds, Euler on the model, then the decoder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from training_tools import flow
from training_tools.config import TrainConfig
from training_tools.text import TextStep

if TYPE_CHECKING:
    from training_tools.models import StudentParts


def sampling_shift(cfg: TrainConfig, latent_h: int, latent_w: int) -> float:
    """The run's timestep shift at a latent size (``flow.shift``, or the resolution shift when 0)."""
    if cfg.flow.shift > 0:
        return cfg.flow.shift
    return flow.resolution_shift(latent_h, latent_w, cfg.flow.base_latent_pixels)


def make_denoiser(
    unet: nn.Module,
    tokens: torch.Tensor,
    pooled: torch.Tensor | None,
    guidance: float = 1.0,
    uncond: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> flow.Denoiser:
    """(x, t) -> velocity with fixed text conditioning (and classifier-free guidance when > 1)."""

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = unet(x, t * 1000, tokens, pooled)
        if uncond is not None and guidance != 1.0:
            v_u = unet(x, t * 1000, uncond[0], uncond[1])
            v = v_u + guidance * (v - v_u)
        return v.float()

    return call


def seeded_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """[len(seeds), C, h, w] float32 noise, one seeded generator per image (batch-independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def to_png(image: torch.Tensor, path: Path) -> Path:
    """[3, H, W] in [-1, 1] -> PNG file."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


@torch.no_grad()
def write_samples(
    cfg: TrainConfig,
    unet: nn.Module,
    text: TextStep,
    parts: StudentParts,
    out_dir: Path,
    step: int,
    steps: int,
    device: torch.device,
) -> list[Path]:
    """Sample every (prompt, seed) pair of ``cfg.sample`` with ``steps`` Euler steps; PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    res = cfg.sample.resolution or cfg.data.resolution
    f = parts.autoencoder.scale_factor
    channels = parts.unet_config.in_channels
    was_training = unet.training
    unet.eval()
    paths: list[Path] = []
    pooled_used = parts.unet_config.pooled_dim > 0
    try:
        for p_index, prompt in enumerate(cfg.sample.prompts):
            tokens, pooled = text.encode([prompt] * len(cfg.sample.seeds))
            u_tokens, u_pooled = text.encode([""] * len(cfg.sample.seeds), drop_all=True)
            den = make_denoiser(
                unet,
                tokens,
                pooled if pooled_used else None,
                cfg.sample.guidance_scale,
                (u_tokens, u_pooled if pooled_used else None),
            )
            noise = seeded_noise(list(cfg.sample.seeds), (channels, res // f, res // f)).to(device)
            latents = flow.euler_sample(den, noise, steps, sampling_shift(cfg, res // f, res // f))
            images = parts.autoencoder.to(device).decode(latents)
            for s_index, image in enumerate(images):
                paths.append(to_png(image, out_dir / f"step-{step:08d}-p{p_index}-s{s_index}.png"))
    finally:
        unet.train(was_training)
    return paths
