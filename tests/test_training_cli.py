"""`snapgen train` and `python -m training_tools` as subprocesses: dry run, events, SIGTERM + resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import test_training_helpers as helpers
from test_training_helpers import base_config, loss_curve, read_events, subprocess_env, write_config

from snapgen_app.progress import decode_event
from training_tools import checkpoint
from training_tools.config import TrainConfig
from training_tools.trainer import Trainer

shapes = helpers.shapes


def test_snapgen_train_dry_run_prints_only_the_estimate(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    cfg = write_config(base_config(tmp_path, data, cache), tmp_path / "cfg.json")
    done = subprocess.run(
        [sys.executable, "-m", "snapgen_app", "train", "pretrain", str(cfg), "--dry-run", "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    events = [decode_event(line) for line in done.stdout.splitlines()]
    assert len(events) == 1 and events[0].kind == "log" and events[0].data["dry_run"]
    assert events[0].data["estimate"]["memory_gib"] > 0
    assert not (tmp_path / "run").exists()


def test_snapgen_train_runs_a_stage_and_shows_progress(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    cfg = write_config(base_config(tmp_path, data, cache, max_steps=3), tmp_path / "cfg.json")
    done = subprocess.run(
        [sys.executable, "-m", "snapgen_app", "train", "pretrain", str(cfg)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "[pretrain] step 3/3 task=" in done.stdout
    assert "finished" in done.stdout
    again = subprocess.run(  # the run dir exists now: refused, exit 1, with the cause on stderr
        [sys.executable, "-m", "snapgen_app", "train", "pretrain", str(cfg)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert again.returncode == 1 and "never overwritten" in again.stderr


def test_sigterm_checkpoints_and_resume_finishes(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, max_steps=100_000)
    path = write_config(cfg, tmp_path / "cfg.json")
    child = subprocess.Popen(
        [sys.executable, "-m", "training_tools", "pretrain", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert child.stdout is not None
    for line in child.stdout:
        if decode_event(line).kind == "progress":
            child.send_signal(signal.SIGTERM)
            break
    rest = child.stdout.read()
    assert child.wait(timeout=120) == 130
    kinds = [decode_event(line).kind for line in rest.splitlines()]
    assert kinds[-1] == "cancelled"
    latest = checkpoint.latest(Path(cfg.run_dir) / "checkpoints")
    assert latest is not None
    stopped_at = int(json.loads((latest / "trainer_state.json").read_text())["step"])
    # max_steps may change on resume: finish two steps later.
    raw = cfg.to_dict()
    raw["max_steps"] = stopped_at + 2
    summary = _run(TrainConfig.from_dict(raw), resume=True)
    assert summary["steps"] == stopped_at + 2
    assert max(loss_curve(Path(cfg.run_dir))) == stopped_at + 2
    assert read_events(Path(cfg.run_dir))[-1].kind == "finished"


def test_snapgen_train_max_minutes_stops_saved_and_rejects_a_bad_budget(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, max_steps=100_000, log_every=1)
    path = write_config(cfg, tmp_path / "cfg.json")
    command = [sys.executable, "-m", "snapgen_app", "train", "pretrain", str(path), "--max-minutes"]
    bad = subprocess.run(
        [*command, "0"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300
    )
    assert bad.returncode == 2 and "--max-minutes must be positive" in bad.stderr
    assert not Path(cfg.run_dir).exists()
    done = subprocess.run(
        [*command, "0.03"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300
    )
    assert done.returncode == 130, done.stderr
    etas = [float(line.split(" eta ")[1].split()[0]) for line in done.stdout.splitlines() if " eta " in line]
    assert etas and max(etas) <= 0.03  # minutes left of the budget, not of the 100,000 steps
    assert "cancelled: stopped after step" in done.stdout
    assert checkpoint.latest(Path(cfg.run_dir) / "checkpoints") is not None


def _run(cfg: TrainConfig, **kwargs: object) -> dict:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(cfg, **kwargs).run()  # type: ignore[arg-type]
