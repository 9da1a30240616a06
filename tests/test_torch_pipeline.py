"""The diffusers pipeline generates from tiny random components and round-trips through save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from snapgen_app.config import TextConditionerConfig
from snapgen_app.errors import ConfigError
from snapgen_app.model.autoencoder import SnapGenAutoencoder, autoencoder_preset
from snapgen_app.model.pipeline import SnapGenPipeline, load_pipeline
from snapgen_app.model.presets import unet_preset
from snapgen_app.model.text_encoders import TextProjection
from snapgen_app.model.unet import SnapGenUNet


def tiny_pipeline(seed: int = 0) -> SnapGenPipeline:
    torch.manual_seed(seed)
    conditioner = TextConditionerConfig(context_dim=32, pooled_projection_dim=16)
    unet = SnapGenUNet.from_unet_config(unet_preset("tiny").replace(context_dim=32, pooled_dim=16))
    vae = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("tiny"))
    projection = TextProjection.from_conditioner_config(conditioner)
    # Fresh models zero-initialise their residual outputs, which would hide the text path; random
    # weights everywhere make every input matter, as in a trained model.
    with torch.no_grad():
        for module in (unet, vae, projection):
            for param in module.parameters():
                param.normal_(0.0, 0.2)
    return SnapGenPipeline.from_components(unet, vae, projection, shift=1.0)


@pytest.fixture(scope="module")
def pipe() -> SnapGenPipeline:
    return tiny_pipeline()


def test_generates_an_image_and_reports_each_step(pipe: SnapGenPipeline) -> None:
    seen: list[tuple[int, int]] = []
    out = pipe(
        ["a red apple", "a blue car"],
        height=32,
        width=32,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(7),
        callback=lambda step, total, t, latents: seen.append((step, total)),
    )
    assert out.images.shape == (2, 32, 32, 3)
    assert out.images.dtype == np.uint8
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert torch.isfinite(out.latents).all()


def test_same_seed_same_pixels_and_guidance_changes_them(pipe: SnapGenPipeline) -> None:
    def run(seed: int, guidance: float) -> np.ndarray:
        return pipe(
            "a cat",
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
        ).images

    first = run(3, 1.0)
    assert np.array_equal(first, run(3, 1.0))
    assert not np.array_equal(first, run(4, 1.0))
    assert not np.array_equal(run(3, 1.0).astype(int), run(3, 4.0).astype(int))


def test_save_and_load_round_trip_is_exact(pipe: SnapGenPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "ckpt")
    for component in ("unet", "autoencoder", "text_conditioner", "scheduler"):
        assert (tmp_path / "ckpt" / component).is_dir()
    assert not list((tmp_path / "ckpt").rglob("*.bin"))
    loaded = load_pipeline(tmp_path / "ckpt")
    a = pipe(
        "a dog", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(1)
    ).images
    b = loaded(
        "a dog", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(1)
    ).images
    assert np.array_equal(a, b)


def test_bad_requests_name_the_field(pipe: SnapGenPipeline) -> None:
    with pytest.raises(ConfigError, match="height"):
        pipe("x", height=36, width=32)
    with pytest.raises(ConfigError, match="num_inference_steps"):
        pipe("x", height=32, width=32, num_inference_steps=0)


def test_incompatible_components_are_refused() -> None:
    unet = SnapGenUNet.from_unet_config(unet_preset("tiny").replace(context_dim=48, pooled_dim=16))
    vae = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("tiny"))
    projection = TextProjection.from_conditioner_config(
        TextConditionerConfig(context_dim=32, pooled_projection_dim=16)
    )
    with pytest.raises(ConfigError, match="context_dim"):
        SnapGenPipeline.from_components(unet, vae, projection)


def test_schedule_matches_the_runtime_grid(pipe: SnapGenPipeline) -> None:
    from snapgen_app.pipeline.sampler import flow_sigmas

    shifted = SnapGenPipeline.from_components(pipe.unet, pipe.autoencoder, pipe.text_conditioner, shift=3.0)
    seen: list[float] = []
    shifted("x", height=32, width=32, num_inference_steps=4, callback=lambda s, n, t, x: seen.append(t))
    assert np.allclose(seen, flow_sigmas(4, 3.0)[:-1], atol=1e-6)


def test_loads_a_training_checkpoint_written_by_export_layout(pipe: SnapGenPipeline, tmp_path: Path) -> None:
    from snapgen_app.model.export import BundleDefaults, write_checkpoint

    write_checkpoint(
        tmp_path / "ckpt",
        unet=pipe.unet,
        autoencoder=pipe.autoencoder,
        text_conditioner=pipe.conditioner,
        defaults=BundleDefaults(steps=2, width=32, height=32, shift=3.0),
    )
    loaded = load_pipeline(tmp_path / "ckpt")
    assert loaded.scheduler.config.shift == 3.0
    a = pipe("a dog", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    b = loaded(
        "a dog", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(1)
    )
    # Same weights; the shift differs (1 vs 3), so the latents must differ while both stay finite.
    assert torch.isfinite(b.latents).all() and not torch.equal(a.latents, b.latents)
