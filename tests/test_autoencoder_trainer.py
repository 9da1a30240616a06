"""The autoencoder trainer on a handful of tiny images: a step budget stops it exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snapgen_app.errors import ConfigError
from training_tools.autoencoder_trainer import AutoencoderTrainConfig, train_autoencoder


def _images(folder: Path, count: int = 8, size: int = 32) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_max_steps_stops_the_run_and_lands_in_the_metrics(tmp_path: Path) -> None:
    cfg = AutoencoderTrainConfig(
        data=str(_images(tmp_path / "data")),
        preset="tiny",
        minutes=10.0,
        max_steps=4,
        max_images=6,
        heldout=2,
        resolution=32,
        crop=16,
        batch_size=2,
        full_batch_size=2,
        warmup_steps=2,
        threads=1,
    )
    final = train_autoencoder(cfg, tmp_path / "run")
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert metrics["train_minutes"] < 10.0
    assert np.isfinite(metrics["heldout_psnr_db"])
    with pytest.raises(ConfigError, match="max_steps"):
        AutoencoderTrainConfig(data="x", max_steps=-1)


def test_scale_equivariance_term_decodes_downsampled_latents_to_downsampled_images() -> None:
    import torch
    import torch.nn.functional as F

    from snapgen_app.model.autoencoder import SnapGenAutoencoder, autoencoder_preset
    from training_tools.autoencoder_trainer import reconstruction_loss

    torch.manual_seed(0)
    model = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("tiny")).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    plain_cfg = AutoencoderTrainConfig(data="x")
    total, terms = reconstruction_loss(model, images, plain_cfg)
    assert "scale_equivariance" not in terms
    cfg = AutoencoderTrainConfig(data="x", scale_equivariance_weight=0.5)
    with torch.no_grad():
        total_se, terms_se = reconstruction_loss(model, images, cfg)
        mean, _ = model.encode_moments(images)
        expected = (model.decoder(F.avg_pool2d(mean, 2)) - F.avg_pool2d(images, 2)).abs().mean()
    assert terms_se["scale_equivariance"] == pytest.approx(float(expected), rel=1e-5)
    assert float(total_se) == pytest.approx(float(total) + 0.5 * float(expected), rel=1e-5)
    with pytest.raises(ConfigError, match="scale_equivariance_weight"):
        AutoencoderTrainConfig(data="x", scale_equivariance_weight=-1.0)
