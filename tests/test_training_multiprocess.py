"""Two CPU processes under `accelerate launch` (gloo backend): the same trainer, data split by rank."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import test_training_helpers as helpers
from test_training_helpers import base_config, read_events, subprocess_env, write_config

shapes = helpers.shapes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and all its ranks (torch's launcher starts each rank in a new session,
    so killing the launcher's process group alone would leave them running)."""
    import psutil  # an Accelerate dependency

    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


class _FakeAccelerator:
    """The two attributes ``end_training`` uses; ``end_training()`` blocks until released."""

    def __init__(self, num_processes: int, blocks: bool) -> None:
        self.num_processes = num_processes
        self.release = threading.Event()
        self.ended = threading.Event()
        if not blocks:
            self.release.set()

    def end_training(self) -> None:
        self.release.wait()
        self.ended.set()


def test_end_training_is_bounded_in_a_multi_process_run(tmp_path: Path) -> None:
    from training_tools.events import EventWriter
    from training_tools.trainer import end_training

    stream = io.StringIO()
    events = EventWriter("pretrain", tmp_path / "events.jsonl", stream=stream)
    stuck = _FakeAccelerator(2, blocks=True)
    started = time.monotonic()
    assert end_training(stuck, events, timeout_s=0.3) is False
    assert 0.3 <= time.monotonic() - started < 5.0
    assert "teardown still waiting" in stream.getvalue()
    stuck.release.set()  # let the daemon thread finish
    assert stuck.ended.wait(5.0)

    quick = _FakeAccelerator(2, blocks=False)
    assert end_training(quick, events, timeout_s=5.0) is True and quick.ended.is_set()
    single = _FakeAccelerator(1, blocks=False)
    assert end_training(single, events, timeout_s=0.0) is True and single.ended.is_set()


def _launch_two(stage: str, config: Path, cwd: Path) -> None:
    """``accelerate launch`` two CPU ranks of ``python -m training_tools STAGE CONFIG``; fails the test
    with the ranks' stderr when the launch fails or runs past 400 s."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = subprocess_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even on a GPU machine: gloo, as in the issue
    # On a timeout the launcher and every rank go (_kill_tree reaches the ranks' own sessions; a rank
    # stuck in its teardown once outlived the launcher), and the output says how far the ranks got.
    proc = subprocess.Popen(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "training_tools",
            stage,
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        _, stderr = proc.communicate()
        pytest.fail(f"two-process run still going after 400 s; its stderr:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]


def test_two_process_accelerate_run(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, batch_size=2, max_steps=4, checkpoint_every=2)
    _launch_two("pretrain", write_config(cfg, tmp_path / "cfg.json"), tmp_path)
    events = read_events(Path(cfg.run_dir))
    assert events[-1].kind == "finished"
    progress = [e for e in events if e.kind == "progress"]
    assert [e.step for e in progress] == [1, 2, 3, 4]  # only the main process reports
    # Each optimizer step consumed 2 processes x 2 samples.
    assert all(e.data["samples_per_s"] > 0 for e in progress)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "step-00000004"
    assert (ckpt / "rng-0.safetensors").exists() and (ckpt / "rng-1.safetensors").exists()


def test_two_process_distillation_with_frozen_text_projections(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    """The recipe's KD student keeps its text projections frozen (``model.train_text`` false); the
    two-rank run trains it: Accelerate would wrap the frozen module in DDP on CPU ranks, which DDP
    refuses ("DistributedDataParallel is not needed when a module doesn't have any parameter that
    requires a gradient", the run died at step 0 before the trainer kept frozen modules out of DDP)."""
    data, cache = shapes
    teacher = helpers.save_snapgen_teacher(tmp_path / "teacher")
    cfg = base_config(
        tmp_path,
        data,
        cache,
        stage="distill",
        batch_size=2,
        max_steps=3,
        **{"teacher.kind": "snapgen", "teacher.path": str(teacher), "model.train_text": False},
    )
    _launch_two("distill", write_config(cfg, tmp_path / "cfg.json"), tmp_path)
    events = read_events(Path(cfg.run_dir))
    assert events[-1].kind == "finished", [e.message for e in events if e.kind == "error"]
    progress = [e for e in events if e.kind == "progress"]
    assert [e.step for e in progress] == [1, 2, 3]
    assert all(e.data["loss"]["kd_out"] > 0 for e in progress)
