"""A run whose loss blows up stops within a few steps and keeps no checkpoint of the blown-up weights
as its newest, so --resume (with another seed) goes on from a healthy one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import test_training_helpers as helpers
from test_training_helpers import base_config, loss_curve, read_events, run_quietly

from snapgen_app.errors import TrainingError
from training_tools import checkpoint
from training_tools.divergence import DivergenceWatch

shapes = helpers.shapes


def _finite(loss: float | None) -> bool:
    """A logged loss is finite (the events write a non-finite one as null)."""
    return loss is not None and math.isfinite(loss)


def test_the_watch_flags_a_lasting_blow_up_not_a_spike_nor_the_warm_up() -> None:
    watch = DivergenceWatch(factor=4.0, patience=3, window=5)
    # Warm-up: the loss falls from far above its later level; nothing is judged before 5 good steps.
    assert not any(watch.update(s, loss) for s, loss in enumerate([9.0, 5.0, 1.0, 0.3, 0.3], start=1))
    assert not watch.update(6, 0.35) and not watch.suspect
    # One spike (5x the median 0.3) is suspect, and a good step ends it.
    assert not watch.update(7, 1.5) and watch.suspect and watch.first_bad_step == 7
    assert not watch.update(8, 0.3) and not watch.suspect and watch.first_bad_step is None
    # Three bad steps in a row: diverged, dated from the first of them.
    assert not watch.update(9, 1.6) and not watch.update(10, 1.7)
    assert watch.update(11, 1.5)
    assert watch.first_bad_step == 9 and "since step 9" in watch.message(1.5)
    assert "median of 0.3" in watch.message(1.5)
    # A non-finite loss is bad even before any history; factor 0 turns the watch off.
    early = DivergenceWatch(factor=4.0, patience=2, window=100)
    assert not early.update(1, math.nan) and early.update(2, math.inf)
    off = DivergenceWatch(factor=0.0, patience=1, window=1)
    assert not any(off.update(s, math.nan) for s in range(5))


def test_set_aside_renames_later_checkpoints_and_repoints_latest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        tmp = checkpoint.begin(root, step)
        checkpoint.commit(root, tmp, step, {"step": step}, keep=5)
    assert checkpoint.latest(root).name == "step-00000006"
    moved = checkpoint.set_aside(root, 4)
    assert [p.name for p in moved] == ["diverged-step-00000004", "diverged-step-00000006"]
    assert all(p.is_dir() for p in moved)  # kept, not deleted
    assert checkpoint.latest(root).name == "step-00000002"
    checkpoint.set_aside(root, 0)
    assert checkpoint.latest(root) is None and not (root / checkpoint.LATEST_FILE).exists()


def test_a_diverging_run_stops_and_sets_its_blown_up_checkpoints_aside(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    data, cache = shapes
    common = {"checkpoint_every": 1, "optim.divergence_patience": 3, "keep_checkpoints": 10}
    healthy = base_config(tmp_path, data, cache, max_steps=3, **common)
    run_quietly(healthy)
    root = Path(healthy.run_dir) / "checkpoints"
    assert checkpoint.latest(root).name == "step-00000003"
    # The same run continued at an absurd learning rate: within a step or two the weights blow up
    # and the loss is no longer finite.
    blown = base_config(tmp_path, data, cache, max_steps=20, **common, **{"optim.lr": 1e30})
    prepared = Path(healthy.run_dir) / "train_config.json"
    prepared.write_text(prepared.read_text().replace('"lr": 0.001', '"lr": 1e+30'))
    with pytest.raises(TrainingError, match="diverged") as err:
        run_quietly(blown, resume=True)
    curve = loss_curve(Path(blown.run_dir))
    first = min(s for s, loss in curve.items() if not _finite(loss))
    assert 4 <= first <= 6 and all(_finite(curve[s]) for s in range(4, first))
    assert max(curve) == first + 2  # stopped at the third bad step in a row
    assert f"since step {first}" in str(err.value)
    # The checkpoint of the step before the first bad loss holds the weights that gave it: set aside
    # (kept), as is every later one; --resume goes on from the one before, whose loss was still good.
    kept = f"step-{first - 2:08d}"
    assert f"--resume continues from {kept}" in (err.value.hint or "")
    assert checkpoint.latest(root).name == kept
    assert (root / f"diverged-step-{first - 1:08d}").is_dir()
    assert not any((root / f"step-{s:08d}").exists() for s in range(first - 1, first + 3))
    assert read_events(Path(blown.run_dir))[-1].kind == "error"
    # Resuming from there with another seed is a change --resume accepts (its steps draw other noise
    # and batches); nothing else of the config may change.
    from training_tools.config import config_differences

    saved = base_config(tmp_path, data, cache, max_steps=3, **common)
    assert config_differences(saved, saved.replace(seed=1)) == []
    assert config_differences(saved, base_config(tmp_path, data, cache, **common, **{"optim.lr": 1e-4})) != []
