"""Shared helpers of the training tests: a generated dataset, tiny teachers, configs, events.

Imported by the other ``test_training_*`` modules (it holds one sanity test itself).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from snapgen_app.progress import Event, decode_event
from training_tools.config import TrainConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square")
REPO = Path(__file__).resolve().parents[1]


def make_shapes_dataset(folder: Path, per_class: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Solid-colour circles and squares on white with ``.txt`` captions ("a red circle")."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(per_class):
                image = Image.new("RGB", (size, size), (255, 255, 255))
                draw = ImageDraw.Draw(image)
                margin = rng.randint(size // 10, size // 4)
                box = (margin, margin, size - margin, size - margin)
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
                image.save(folder / f"{colour}_{shape}_{k}.png")
                (folder / f"{colour}_{shape}_{k}.txt").write_text(f"a {colour} {shape}")
    return folder


def base_config(tmp: Path, data: Path, cache: Path, **overrides: Any) -> TrainConfig:
    """A fast tiny-model config (32 px, fp32, one thread); ``overrides`` are top-level or dotted keys."""
    raw: dict[str, Any] = {
        "run_dir": str(tmp / "run"),
        "seed": 0,
        "batch_size": 4,
        "max_steps": 10,
        "mixed_precision": "no",
        "cpu_threads": 1,
        "checkpoint_every": 0,
        "data": {"path": str(data), "resolution": 32, "cache_dir": str(cache)},
        "model": {"unet_preset": "tiny", "autoencoder_preset": "tiny", "text_max_length": 8},
        "flow": {"shift": 1.0},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "sample": {"prompts": ["a red circle"], "seeds": [0], "steps": 4},
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig.from_dict(raw)


def read_events(run_dir: Path) -> list[Event]:
    """Events the run wrote to ``run_dir/events.jsonl``."""
    path = run_dir / "events.jsonl"
    return [decode_event(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(run_dir: Path, term: str = "task") -> dict[int, float]:
    """step -> loss term from the progress events (the last value wins for a step logged twice)."""
    return {e.step: e.data["loss"][term] for e in read_events(run_dir) if e.kind == "progress"}


def save_snapgen_teacher(folder: Path, seed: int = 1, preset: str = "tiny") -> Path:
    """A randomly initialised tiny SnapGen UNet saved in diffusers layout."""
    from snapgen_app.model.presets import unet_preset
    from snapgen_app.model.unet import SnapGenUNet

    torch.manual_seed(seed)
    model = SnapGenUNet.from_unet_config(unet_preset(preset))
    # Wake the zero-initialised residual branches so the teacher is not an almost-linear map.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and float(p.abs().max()) == 0.0:
                p.normal_(0, 0.05)
        model.conv_out.weight.mul_(4.0)  # velocities of about unit size: curved enough paths
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def save_unet2d_teacher(folder: Path, seed: int = 2, in_channels: int = 16) -> Path:
    """A tiny diffusers UNet2DConditionModel (cross-attention width 32, like the tiny student's context)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=4,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def save_sd3_teacher(folder: Path, seed: int = 3) -> Path:
    """A tiny diffusers SD3Transformer2DModel (joint attention width 32, pooled 16)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m training_tools`` children: one thread, and never the repo root on
    sys.path (its ``packaging/`` folder would shadow the ``packaging`` distribution)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def write_config(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def test_dataset_has_captions_for_every_image(tmp_path: Path) -> None:
    folder = make_shapes_dataset(tmp_path / "d", per_class=1)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 8
    assert all(p.with_suffix(".txt").read_text().startswith("a ") for p in images)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset folder, shared latent/text cache folder) for the whole session."""
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root / "data", per_class=2), root / "cache"


@pytest.fixture(scope="session")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny randomly initialised teachers saved in diffusers layout, one per adapter kind."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "snapgen": save_snapgen_teacher(root / "snapgen"),
        "unet2d": save_unet2d_teacher(root / "unet2d"),
        "sd3": save_sd3_teacher(root / "sd3"),
    }


def run_quietly(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Run a Trainer in-process with its JSON lines kept off the test output."""
    import contextlib
    import io

    from training_tools.trainer import Trainer

    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(cfg, **kwargs).run()


def save_autoencoder(folder: Path, latent_channels: int, seed: int = 3) -> Path:
    """A randomly initialised ``tiny``-preset autoencoder with ``latent_channels``, diffusers layout."""
    from snapgen_app.model.autoencoder import SnapGenAutoencoder, autoencoder_preset

    torch.manual_seed(seed)
    cfg = autoencoder_preset("tiny").with_latent_channels(latent_channels)
    SnapGenAutoencoder.from_autoencoder_config(cfg).save_pretrained(str(folder))
    return folder
