"""Bad input of the training issue: each gives a clear, actionable error (and never loses work)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_training_helpers as helpers
import torch
from safetensors import SafetensorError
from test_training_helpers import (
    base_config,
    run_quietly,
    save_autoencoder,
    save_snapgen_teacher,
    save_unet2d_teacher,
)

from snapgen_app.errors import ConfigError, TrainingError
from training_tools import checkpoint
from training_tools.__main__ import main as cli_main
from training_tools.config import TrainConfig

shapes = helpers.shapes


def test_unknown_config_key_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"run_dir": "r", "data": {"path": "d"}, "learning_rate": 1e-4})
    with pytest.raises(ConfigError, match=r"OptimConfig\.lrr: unknown field"):
        TrainConfig.from_dict({"run_dir": "r", "data": {"path": "d"}, "optim": {"lrr": 1}})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run_dir": "r", "data": {"path": "d"}, "bogus": 1}))
    assert cli_main(["pretrain", str(path)]) == 2
    assert "bogus" in capsys.readouterr().err
    path.write_text(
        json.dumps({"run_dir": "r", "data": {"path": "d"}, "stage": "distill", "teacher": {"path": "t"}})
    )
    assert cli_main(["pretrain", str(path)]) == 2


def test_existing_run_dir_is_never_overwritten(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, max_steps=2)
    run_quietly(cfg)
    before = (Path(cfg.run_dir) / "events.jsonl").read_text()
    with pytest.raises(TrainingError, match="never overwritten") as info:
        run_quietly(cfg)
    assert "--resume" in str(info.value)
    assert (Path(cfg.run_dir) / "events.jsonl").read_text() == before
    other = base_config(tmp_path, data, cache, max_steps=2, **{"optim.lr": 5e-4})
    with pytest.raises(TrainingError, match=r"optim\.lr"):
        run_quietly(other, resume=True)
    with pytest.raises(TrainingError, match="cannot resume"):
        run_quietly(base_config(tmp_path / "fresh", data, cache), resume=True)


def test_resolution_that_does_not_fit_is_refused_with_the_estimate(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, max_memory_gb=0.25, **{"data.resolution": 256})
    with pytest.raises(TrainingError, match=r"256 px .* needs about [0-9.]+ GiB .* 0.25 GiB are available"):
        run_quietly(cfg)
    assert not Path(cfg.run_dir).exists()


def test_teacher_with_another_latent_space_is_refused(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    teacher = save_unet2d_teacher(tmp_path / "t4", in_channels=4)
    cfg = base_config(
        tmp_path, data, cache, stage="distill", **{"teacher.kind": "unet2d", "teacher.path": str(teacher)}
    )
    with pytest.raises(
        TrainingError, match=r"4-channel latent space .* 16-channel one: their latent spaces are incompatible"
    ):
        run_quietly(cfg)


def test_a_unet_checkpoint_of_another_latent_space_than_the_autoencoder_is_refused(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    data, _ = shapes
    unet = save_snapgen_teacher(tmp_path / "unet16")  # the tiny preset: 16 channels
    cfg = base_config(
        tmp_path,
        data,
        tmp_path / "cache",
        **{
            "model.unet_path": str(unet),
            "model.autoencoder_path": str(save_autoencoder(tmp_path / "ae8", 8)),
        },
    )
    with pytest.raises(TrainingError, match="8-channel latents but the UNet takes 16 channels"):
        run_quietly(cfg)


def test_data_problems_reach_the_user(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingError, match="is empty"):
        run_quietly(base_config(tmp_path / "a", empty, tmp_path / "c"))
    with pytest.raises(TrainingError, match="is not a multiple of 32"):
        run_quietly(base_config(tmp_path / "b", empty, tmp_path / "c", **{"data.resolution": 48}))


def test_disk_full_at_checkpoint_time_keeps_the_previous_checkpoint(
    tmp_path: Path, shapes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, max_steps=6, checkpoint_every=2)
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def filling_disk(tensors: dict[str, torch.Tensor], filename: str) -> None:
        if "step-00000004" in filename:  # the disk fills while the second checkpoint is written
            calls["n"] += 1
            Path(filename).write_bytes(b"\0" * 64)  # a partial file, then what safetensors raises
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", filling_disk)
    with pytest.raises(TrainingError, match=r"No space left on device.*step-00000002 is intact") as info:
        run_quietly(cfg)
    assert "--resume" in str(info.value)
    root = Path(cfg.run_dir) / "checkpoints"
    assert calls["n"] == 1
    assert checkpoint.latest(root).name == "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    summary = run_quietly(cfg, resume=True)  # space freed: the run continues from step 2
    assert summary["steps"] == 6


def test_snapgen_t2i_at_1024_px_is_estimated_and_refused_on_a_small_device(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"path": str(tmp_path), "resolution": 1024},
            "batch_size": 1,
            "max_memory_gb": 8.0,
            "mixed_precision": "bf16",  # the estimate below is bf16's ("auto" takes fp32 on a CPU without bf16)
            "model": {
                "unet_preset": "snapgen-t2i",
                "autoencoder_preset": "snapgen-tiny",
                "text_max_length": 256,
            },
        }
    )
    from training_tools.trainer import Trainer

    with pytest.raises(TrainingError, match=r"1024 px with batch 1 needs about 1[0-9]\.[0-9]+ GiB") as info:
        Trainer(cfg).run()
    assert "gradient_checkpointing" in str(info.value)
    assert not (tmp_path / "run").exists()
