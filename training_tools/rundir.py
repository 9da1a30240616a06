"""Run directories: create a new one, refuse to overwrite, or check it for resuming."""

from __future__ import annotations

from pathlib import Path

from snapgen_app.errors import TrainingError
from training_tools.config import TrainConfig, config_differences

CONFIG_FILE = "train_config.json"


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """Create ``cfg.run_dir`` for a new run, or validate it for ``resume``. Never overwrites.

    New run: the directory must not exist or be empty. Resume: it must hold a ``train_config.json``
    equal to ``cfg`` except for the fields in RESUMABLE_CHANGES.
    """
    run_dir = Path(cfg.run_dir)
    saved_path = run_dir / CONFIG_FILE
    if resume:
        if not saved_path.exists():
            raise TrainingError(
                f"cannot resume: {run_dir} holds no {CONFIG_FILE}",
                hint="start a new run without --resume, or point run_dir at an existing run",
            )
        saved = TrainConfig.load(saved_path)
        diffs = config_differences(saved, cfg)
        if diffs:
            raise TrainingError(
                f"cannot resume {run_dir}: the config differs from the saved one in {', '.join(diffs[:6])}",
                hint=f"resume with {saved_path} itself, or start a new run in another run_dir",
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        what = "a training run" if saved_path.exists() else "files"
        raise TrainingError(
            f"run directory {run_dir} already exists and holds {what}; it is never overwritten",
            hint="pass --resume to continue that run, or choose a new run_dir",
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(saved_path)
    return run_dir
