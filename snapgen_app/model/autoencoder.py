"""SnapGen's tiny attention-free decoder, a matching small encoder, and the autoencoder component.

The decoder is the only part of the autoencoder that runs at generation time, so it is built for
speed: no attention, separable convolutions (depthwise 3x3 + pointwise), GroupNorm + SiLU, and
residual blocks whose last pointwise conv starts at zero (each block starts as the identity, which
keeps early training stable). ``snapgen-tiny`` lands at about 1.38 M parameters, the paper's
figure (SD3's VAE decoder has about 49.5 M, see :func:`build_sd3_vae`).

Latents: the encoder returns raw latents; diffusion space is ``(raw - shift) * scale``
(:class:`SnapGenAutoencoder` applies it both ways). Images are NCHW float32 in [-1, 1].
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from snapgen_app.config import AutoencoderConfig, DecoderConfig, EncoderConfig
from snapgen_app.errors import ConfigError

__all__ = [
    "AUTOENCODER_PRESETS",
    "SD3_VAE_CONFIG",
    "LatentDecoder",
    "Reconstruction",
    "SeparableResBlock",
    "SnapGenAutoencoder",
    "TinyDecoder",
    "TinyEncoder",
    "autoencoder_preset",
    "build_sd3_vae",
    "count_parameters",
]


def separable_conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (``stride``) followed by a pointwise 1x1 from ``in_channels`` to ``out_channels``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels),
        nn.Conv2d(in_channels, out_channels, 1),
    )


class SeparableResBlock(nn.Module):
    """x + f(x), f = GN -> SiLU -> dw3x3 -> pw(C->eC) -> GN -> SiLU -> dw3x3 -> pw(eC->C, zero init).

    With ``norm=False``: f = ReLU -> dw3x3 -> pw(C->eC) -> ReLU -> dw3x3 -> pw(eC->C, zero init), no
    normalisation (TAESD-style). On a CPU that is what makes a high-resolution stage fast: ONNX Runtime
    exports GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, each a pass over
    the largest tensors of the network and a layout change out of and back into its blocked (NCHWc)
    convolutions, while a ReLU fuses into the convolution before it.

    Input and output [B, C, H, W]. The zero-initialised last conv makes the block the identity at
    initialisation.
    """

    def __init__(self, channels: int, expansion: int, norm_groups: int, norm: bool = True) -> None:
        super().__init__()
        inner = channels * expansion
        self.norm1: nn.Module = nn.GroupNorm(norm_groups, channels) if norm else nn.Identity()
        self.conv1 = separable_conv(channels, inner)
        self.norm2: nn.Module = nn.GroupNorm(norm_groups, inner) if norm else nn.Identity()
        self.conv2 = separable_conv(inner, channels)
        self.act = F.silu if norm else F.relu
        last = cast(nn.Conv2d, self.conv2[1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(cast(torch.Tensor, last.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return x + h


class Upsample(nn.Module):
    """Pointwise channel change at low resolution, nearest 2x, then a depthwise 3x3 to smooth it."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, 1)
        self.smooth = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.smooth(F.interpolate(self.project(x), scale_factor=2.0, mode="nearest"))


class TinyDecoder(nn.Module):
    """Raw latent [B, latent_channels, h, w] float32 -> image [B, out_channels, h*f, w*f] (unbounded).

    f = ``config.scale_factor``. No attention anywhere; see :class:`SeparableResBlock`. Only the
    ``config.norm_stages`` lowest-resolution stages (all when None) normalise; the output head
    normalises only when the last stage does.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        normed = len(channels) if config.norm_stages is None else config.norm_stages
        layers = config.stage_layers or (config.layers_per_block,) * len(channels)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for index, width in enumerate(channels):
            blocks: list[nn.Module] = [
                SeparableResBlock(width, config.expansion, config.norm_groups, norm=index < normed)
                for _ in range(layers[index])
            ]
            if index + 1 < len(channels):
                blocks.append(Upsample(width, channels[index + 1]))
            self.stages.append(nn.Sequential(*blocks))
        last_normed = normed >= len(channels)
        self.norm_out: nn.Module = (
            nn.GroupNorm(config.norm_groups, channels[-1]) if last_normed else nn.Identity()
        )
        self.act_out = F.silu if last_normed else F.relu
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latent)
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(self.act_out(self.norm_out(h)))


class TinyEncoder(nn.Module):
    """Image [B, in_channels, H, W] float32 in [-1, 1] -> moments [B, 2*latent or latent, H/f, W/f].

    With ``double_z`` the output holds mean and log-variance stacked along channels (mean first);
    otherwise it is the mean only. H and W must be multiples of f = ``config.scale_factor``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for index, width in enumerate(channels):
            blocks: list[nn.Module] = [
                SeparableResBlock(width, config.expansion, config.norm_groups)
                for _ in range(config.layers_per_block)
            ]
            if index + 1 < len(channels):
                # Strided depthwise conv halves the resolution, the pointwise widens the channels.
                blocks.append(separable_conv(width, channels[index + 1], stride=2))
            self.stages.append(nn.Sequential(*blocks))
        out = config.latent_channels * (2 if config.double_z else 1)
        self.norm_out = nn.GroupNorm(config.norm_groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], out, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(image)
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Reconstruction(NamedTuple):
    """Output of :meth:`SnapGenAutoencoder.forward`: unclamped image and the raw posterior."""

    image: torch.Tensor  # [B, 3, H, W] float32, not clamped (for losses)
    mean: torch.Tensor  # [B, C, H/f, W/f] raw latent mean
    logvar: torch.Tensor | None  # [B, C, H/f, W/f] or None without double_z


class LatentDecoder(nn.Module):
    """Diffusion-space latent [B, C, h, w] float32 -> image [B, 3, h*f, w*f] float32 in [-1, 1].

    The generation-time decoder: undoes scaling/shift, decodes and clamps. This is the module the
    runtime bundle's ``decoder.<precision>.onnx`` is exported from (input ``latent``, output ``image``).
    """

    def __init__(self, decoder: TinyDecoder, scaling_factor: float, shift_factor: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        raw = latent / self.scaling_factor + self.shift_factor
        return self.decoder(raw).clamp(-1.0, 1.0)


class SnapGenAutoencoder(ModelMixin, ConfigMixin):
    """Tiny encoder + decoder with SD3-style scaling/shift; a diffusers component.

    ``save_pretrained(dir)`` writes ``config.json`` + ``diffusion_pytorch_model.safetensors``;
    ``from_pretrained(dir)`` reads them back. The constructor takes the fields of
    :class:`~snapgen_app.config.AutoencoderConfig` (``encoder_config``/``decoder_config`` as JSON
    objects; named so because diffusers resolves config keys before submodule attributes); use
    :meth:`from_autoencoder_config` from typed configs.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        encoder_config: dict[str, Any] | None = None,
        decoder_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder_config = AutoencoderConfig.from_dict(
            {
                "latent_channels": latent_channels,
                "scaling_factor": scaling_factor,
                "shift_factor": shift_factor,
                "encoder": dict(encoder_config or {"latent_channels": latent_channels}),
                "decoder": dict(decoder_config or {"latent_channels": latent_channels}),
            }
        )
        self.encoder = TinyEncoder(self.autoencoder_config.encoder)
        self.decoder = TinyDecoder(self.autoencoder_config.decoder)

    @classmethod
    def from_autoencoder_config(cls, config: AutoencoderConfig) -> SnapGenAutoencoder:
        """Build (randomly initialised) from a typed :class:`AutoencoderConfig`."""
        raw = config.to_dict()
        return cls(
            latent_channels=raw["latent_channels"],
            scaling_factor=raw["scaling_factor"],
            shift_factor=raw["shift_factor"],
            encoder_config=raw["encoder"],
            decoder_config=raw["decoder"],
        )

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the presets)."""
        return self.autoencoder_config.scale_factor

    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image [B, 3, H, W] in [-1, 1] -> (raw mean, raw logvar or None), each [B, C, H/f, W/f]."""
        moments = self.encoder(image)
        if not self.autoencoder_config.encoder.double_z:
            return moments, None
        mean, logvar = moments.chunk(2, dim=1)
        # Clamp as diffusers' DiagonalGaussianDistribution does, so exp() never overflows.
        return mean, logvar.clamp(-30.0, 20.0)

    def to_diffusion_space(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latent -> diffusion-space latent: (raw - shift) * scale."""
        cfg = self.autoencoder_config
        return (raw - cfg.shift_factor) * cfg.scaling_factor

    def from_diffusion_space(self, latent: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latent -> raw latent: latent / scale + shift."""
        cfg = self.autoencoder_config
        return latent / cfg.scaling_factor + cfg.shift_factor

    def encode(
        self, image: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Image [B, 3, H, W] float32 in [-1, 1] -> diffusion-space latent [B, C, H/f, W/f] float32.

        Uses the posterior mean unless ``sample`` (then mean + std * noise from ``generator``).
        """
        mean, logvar = self.encode_moments(image)
        raw = mean
        if sample and logvar is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            raw = mean + torch.exp(0.5 * logvar) * noise
        return self.to_diffusion_space(raw)

    def decode(self, latent: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Diffusion-space latent [B, C, h, w] float32 -> image [B, 3, h*f, w*f] float32.

        Clamped to [-1, 1] unless ``clamp`` is False (training losses want the raw output).
        """
        image = self.decoder(self.from_diffusion_space(latent))
        return image.clamp(-1.0, 1.0) if clamp else image

    def latent_decoder(self) -> LatentDecoder:
        """The decoder with scaling/shift and clamping folded in (shares weights with ``self``)."""
        cfg = self.autoencoder_config
        return LatentDecoder(self.decoder, cfg.scaling_factor, cfg.shift_factor)

    def forward(
        self, image: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Reconstruction:
        """Image [B, 3, H, W] in [-1, 1] -> :class:`Reconstruction` (unclamped image, raw mean, logvar)."""
        mean, logvar = self.encode_moments(image)
        raw = mean
        if sample and logvar is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            raw = mean + torch.exp(0.5 * logvar) * noise
        return Reconstruction(self.decoder(raw), mean, logvar)


# SD3's latent statistics (stabilityai/stable-diffusion-3-medium, vae/config.json): presets that
# decode the SD3 latent space use them; a self-trained latent space measures its own.
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609

# 128 px emoji images -> 16x16x16 latents; sized to train on 2 CPU cores in ~20 minutes. The
# full-resolution stages are thin (16 channels) because they dominate training time there (~1.5x
# more 64-px crops/s than 32 channels); norm_groups 8 keeps 2 channels per group so GroupNorm does
# not erase per-channel colour.
_EMOJI = AutoencoderConfig(
    latent_channels=16,
    encoder=EncoderConfig(block_out_channels=(16, 64, 128, 192), layers_per_block=1, norm_groups=8),
    decoder=DecoderConfig(block_out_channels=(192, 128, 64, 16), layers_per_block=2, norm_groups=8),
)

AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # The paper's decoder: ~1.38 M parameters, 16-channel latent, 8x, no attention.
    "snapgen-tiny": AutoencoderConfig(
        latent_channels=16,
        scaling_factor=SD3_SCALING_FACTOR,
        shift_factor=SD3_SHIFT_FACTOR,
        encoder=EncoderConfig(block_out_channels=(48, 96, 192, 288), layers_per_block=2),
        decoder=DecoderConfig(block_out_channels=(288, 224, 112, 48), layers_per_block=2),
    ),
    "emoji": _EMOJI,
    # The same with 8- and 4-channel latents (the emoji-world feasibility run used 16x16x8); a pilot
    # found no faster learning with them (docs/training.md).
    "emoji-c8": _EMOJI.with_latent_channels(8),
    "emoji-c4": _EMOJI.with_latent_channels(4),
    # Tests only: a few thousand parameters, still 16 channels and 8x.
    "tiny": AutoencoderConfig(
        latent_channels=16,
        encoder=EncoderConfig(
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, expansion=1, norm_groups=4
        ),
        decoder=DecoderConfig(
            block_out_channels=(16, 16, 8, 8), layers_per_block=1, expansion=1, norm_groups=4
        ),
    ),
}


def autoencoder_preset(name: str) -> AutoencoderConfig:
    """The :class:`AutoencoderConfig` registered under ``name`` in :data:`AUTOENCODER_PRESETS`."""
    try:
        return AUTOENCODER_PRESETS[name]
    except KeyError:
        raise ConfigError(
            "autoencoder preset", f"unknown preset {name!r}", allowed=sorted(AUTOENCODER_PRESETS)
        ) from None


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


# The public vae/config.json of stabilityai/stable-diffusion-3-medium, written out so the SD3
# decoder architecture can be built offline (random weights) for size and speed comparisons.
SD3_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": SD3_SCALING_FACTOR,
    "shift_factor": SD3_SHIFT_FACTOR,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def build_sd3_vae(seed: int = 0) -> AutoencoderKL:
    """SD3's AutoencoderKL architecture with random weights (seeded); no download.

    ``count_parameters(vae.decoder)`` is about 49.5 M. Decode with ``vae.decode(raw_latent).sample``.
    """
    torch.manual_seed(seed)
    return AutoencoderKL(**SD3_VAE_CONFIG)
