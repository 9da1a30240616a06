"""Tiny decoder/encoder and the SnapGenAutoencoder component: size, shapes, scaling, save/load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from torch import nn

from snapgen_app.config import AutoencoderConfig, DecoderConfig, EncoderConfig
from snapgen_app.errors import ConfigError
from snapgen_app.model.autoencoder import (
    AUTOENCODER_PRESETS,
    SD3_VAE_CONFIG,
    SeparableResBlock,
    SnapGenAutoencoder,
    TinyDecoder,
    autoencoder_preset,
    count_parameters,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread avoids oversubscription on the shared 2-core machine (40x slower there)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomize(module: nn.Module, seed: int) -> None:
    """Give every parameter random values (zero-initialised convs would hide save/load bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _tiny_autoencoder(scaling: float = 1.7, shift: float = 0.25, seed: int = 0) -> SnapGenAutoencoder:
    config = autoencoder_preset("tiny").replace(scaling_factor=scaling, shift_factor=shift)
    torch.manual_seed(seed)
    return SnapGenAutoencoder.from_autoencoder_config(config).eval()


def test_snapgen_tiny_decoder_has_paper_size_and_no_attention() -> None:
    decoder = TinyDecoder(autoencoder_preset("snapgen-tiny").decoder)
    params = count_parameters(decoder)
    assert abs(params - 1.38e6) / 1.38e6 < 0.10, params
    names = [type(m).__name__.lower() for m in decoder.modules()]
    assert not any("attention" in name for name in names)
    # Every 3x3 conv is depthwise except the dense stem (latent -> width) and the RGB head.
    dense_3x3 = [
        name
        for name, m in decoder.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1
    ]
    assert dense_3x3 == ["conv_in", "conv_out"]


def test_snapgen_tiny_is_about_36x_smaller_than_sd3_decoder() -> None:
    with torch.device("meta"):  # architecture only: no memory, no init cost
        sd3 = AutoencoderKL(**SD3_VAE_CONFIG)
    sd3_decoder = count_parameters(sd3.decoder)
    assert 48e6 < sd3_decoder < 51e6, sd3_decoder
    ratio = sd3_decoder / count_parameters(TinyDecoder(autoencoder_preset("snapgen-tiny").decoder))
    assert 32 < ratio < 40, ratio


@pytest.mark.parametrize("name", sorted(AUTOENCODER_PRESETS))
def test_presets_are_8x_with_one_latent_width(name: str) -> None:
    config = autoencoder_preset(name)
    assert config.encoder.latent_channels == config.decoder.latent_channels == config.latent_channels
    assert config.scale_factor == 8
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_papers_decoder_preset_uses_16_channels() -> None:
    assert autoencoder_preset("snapgen-tiny").latent_channels == 16


def test_encoder_and_decoder_shapes_at_8x() -> None:
    ae = _tiny_autoencoder()
    image = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        latent = ae.encode(image)
        decoded = ae.decode(latent)
        mean, logvar = ae.encode_moments(image)
    assert latent.shape == (2, 16, 8, 6)
    assert logvar is not None and mean.shape == logvar.shape == (2, 16, 8, 6)
    assert decoded.shape == (2, 3, 64, 48) and decoded.dtype == torch.float32
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0


def test_emoji_preset_maps_128px_to_16x16x16() -> None:
    torch.manual_seed(0)
    ae = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("emoji")).eval()
    with torch.no_grad():
        latent = ae.encode(torch.zeros(1, 3, 128, 128))
        image = ae.decode(latent)
    assert latent.shape == (1, 16, 16, 16)
    assert image.shape == (1, 3, 128, 128)


def test_scaling_and_shift_are_applied_both_ways() -> None:
    ae = _tiny_autoencoder(scaling=1.5305, shift=0.0609)
    _randomize(ae, seed=1)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, _ = ae.encode_moments(image)
        latent = ae.encode(image)
        torch.testing.assert_close(latent, (mean - 0.0609) * 1.5305)
        raw_image = ae.decoder(latent / 1.5305 + 0.0609)
        torch.testing.assert_close(ae.decode(latent, clamp=False), raw_image)
        torch.testing.assert_close(ae.decode(latent), raw_image.clamp(-1, 1))
        torch.testing.assert_close(ae.latent_decoder()(latent), raw_image.clamp(-1, 1))


def test_sampling_uses_the_posterior_and_is_seeded() -> None:
    ae = _tiny_autoencoder()
    _randomize(ae, seed=2)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        first = ae.encode(image, sample=True, generator=torch.Generator().manual_seed(5))
        again = ae.encode(image, sample=True, generator=torch.Generator().manual_seed(5))
        mean = ae.encode(image)
    assert torch.equal(first, again)
    assert not torch.allclose(first, mean)


def test_residual_blocks_start_as_identity() -> None:
    block = SeparableResBlock(16, expansion=2, norm_groups=4)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    ae = _tiny_autoencoder()
    _randomize(ae, seed=3)
    ae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = SnapGenAutoencoder.from_pretrained(tmp_path).eval()
    assert loaded.autoencoder_config == ae.autoencoder_config
    original, restored = ae.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    latent = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(ae.decode(latent), loaded.decode(latent))


def test_tiny_autoencoder_learns() -> None:
    torch.manual_seed(0)
    ae = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("tiny"))
    optimizer = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    # Smooth images (4x4 colour fields upsampled): compressible by an 8x, 16-channel bottleneck.
    coarse = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    losses = []
    for _ in range(60):
        loss = (ae(images).image - images).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_unknown_preset_lists_the_allowed_names() -> None:
    with pytest.raises(ConfigError, match="snapgen-tiny") as info:
        autoencoder_preset("huge")
    assert "emoji" in str(info.value) and "huge" in str(info.value)


def test_inconsistent_autoencoder_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"decoder\.latent_channels"):
        AutoencoderConfig(latent_channels=16, decoder=DecoderConfig(latent_channels=4))
    with pytest.raises(ConfigError, match="same number of stages"):
        AutoencoderConfig(encoder=EncoderConfig(block_out_channels=(32, 64)))
    with pytest.raises(ConfigError, match="norm_groups"):
        DecoderConfig(block_out_channels=(24,), norm_groups=16)
    with pytest.raises(ConfigError, match="unknown field"):
        AutoencoderConfig.from_dict({"latent_channel": 16})


def test_norm_free_high_resolution_stages_and_per_stage_depth() -> None:
    """``norm_stages`` keeps GroupNorm in the low-resolution stages only; ``stage_layers`` sets the
    depth per stage. Old configs (neither field) build the all-normalised decoder they were saved with."""
    config = DecoderConfig(
        block_out_channels=(32, 16, 16, 8), norm_groups=4, norm_stages=2, stage_layers=(2, 2, 1, 0)
    )
    decoder = TinyDecoder(config)
    blocks = [[m for m in stage if isinstance(m, SeparableResBlock)] for stage in decoder.stages]
    assert [len(b) for b in blocks] == [2, 2, 1, 0]
    assert all(isinstance(b.norm1, nn.GroupNorm) for b in blocks[0] + blocks[1])
    assert all(isinstance(b.norm1, nn.Identity) and isinstance(b.norm2, nn.Identity) for b in blocks[2])
    assert isinstance(decoder.norm_out, nn.Identity)
    block = blocks[2][0]
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(block(x), x)  # still the identity at initialisation
    assert decoder(torch.randn(1, 16, 4, 4)).shape == (1, 3, 32, 32)
    old = DecoderConfig.from_dict(
        {k: v for k, v in DecoderConfig().to_dict().items() if k not in ("norm_stages", "stage_layers")}
    )
    assert all(
        isinstance(m.norm1, nn.GroupNorm)
        for m in TinyDecoder(old).modules()
        if isinstance(m, SeparableResBlock)
    )
    with pytest.raises(ConfigError, match="stage_layers"):
        DecoderConfig(stage_layers=(1, 1))
    with pytest.raises(ConfigError, match="norm_stages"):
        DecoderConfig(norm_stages=5)
