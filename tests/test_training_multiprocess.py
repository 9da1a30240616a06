"""Two CPU processes under `accelerate launch` (gloo backend): the same trainer, data split by rank."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import test_training_helpers as helpers
from test_training_helpers import base_config, read_events, subprocess_env, write_config

shapes = helpers.shapes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_accelerate_run(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, batch_size=2, max_steps=4, checkpoint_every=2)
    path = write_config(cfg, tmp_path / "cfg.json")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = subprocess_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even on a GPU machine: gloo, as in the issue
    # Its own process group: on a timeout every rank goes (a rank left waiting for a peer once
    # outlived the launcher), and the output says how far the ranks got.
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
            "pretrain",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"two-process run still going after 400 s; its stderr:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    events = read_events(Path(cfg.run_dir))
    assert events[-1].kind == "finished"
    progress = [e for e in events if e.kind == "progress"]
    assert [e.step for e in progress] == [1, 2, 3, 4]  # only the main process reports
    # Each optimizer step consumed 2 processes x 2 samples.
    assert all(e.data["samples_per_s"] > 0 for e in progress)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "step-00000004"
    assert (ckpt / "rng-0.safetensors").exists() and (ckpt / "rng-1.safetensors").exists()
