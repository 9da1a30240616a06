"""Issue 7's last two bad inputs, driven through the real widgets: the trainer dying in the middle
of a fine-tuning run (SIGKILL, no error event) and a full disk while generating. Each becomes a
message in the window, the application keeps running and the images already generated stay."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import test_ui_wizard as wizard_tests
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot
from test_ui_generate import _fill
from test_ui_wizard import make_folder, tiny_request
from ui_support import (
    PROMPT,
    TINY_MODEL,
    collect_messages,
    install_tiny,
    make_window,
    registry_for,
    wait_for_end,
)

from snapgen_app import service
from snapgen_app.api import GenerationRequest
from ui.main_window import MainWindow
from ui.pages.wizard import FOLDER, TRAIN

pytest_plugins = ["ui_support"]  # fixtures: ui_home, tiny_bundle

ft = service.finetune
# the wizard tests' fixtures (pytest finds fixtures by module namespace): the tiny base checkpoint,
# and one thread for the trainer subprocess
base_checkpoint = wizard_tests.base_checkpoint
_one_thread_children = wizard_tests._one_thread_children


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file of ``folder``, hidden temp files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _generate_in_window(qtbot: QtBot, window: MainWindow, seed: int) -> list[Path]:
    """One 1-step image through the Generate page; its paths."""
    messages = collect_messages(window)
    _fill(window, seed=seed, steps=1)
    job_id = window.generate_page.submit()
    assert job_id is not None
    end = wait_for_end(qtbot, messages, job_id)
    assert end.kind == "finished", end.error
    return [Path(p) for p in end.result.images]


def _stepped_after_start(handle: object, starts: int) -> bool:
    """True once the ``starts``-th launch (one ``started`` event each) reported a training step."""
    kinds = [e.kind for e in handle.history]
    begun = [i for i, kind in enumerate(kinds) if kind == "started"]
    return len(begun) >= starts and "progress" in kinds[begun[starts - 1] :]


def _kill(pid: int) -> None:
    """SIGKILL the trainer's whole session (it runs in its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def test_training_crash_is_a_message_with_retry_and_start_over(
    qtbot: QtBot, ui_home: Path, tmp_path: Path, tiny_bundle: Path, base_checkpoint: Path
) -> None:
    install_tiny(ui_home, tiny_bundle)
    earlier = Path(
        service.generate(
            GenerationRequest(
                prompt=PROMPT, model=TINY_MODEL, seed=3, steps=1, output_dir=str(ui_home / "outputs")
            )
        ).images[0]
    )
    before = _digest(earlier)
    folder = make_folder(tmp_path / "pictures")
    handle = ft.start(
        tiny_request(folder, base_checkpoint, "crashy", steps=100_000), registry=registry_for(ui_home)
    )
    try:
        window = make_window(qtbot, ui_home)
        page, train = window.wizard_page, window.wizard_page.train_step
        assert page.wizard.currentId() == TRAIN and page.state.handle.name == "crashy"
        assert window.gallery_page.paths() == [earlier]
        qtbot.waitUntil(lambda: train.plot.point_count() >= 1, timeout=120_000)
        assert train.last_state == "running"

        _kill(handle.pid)  # dies mid-run: no error, finished or cancelled event
        qtbot.waitUntil(lambda: train.last_state == "failed", timeout=20_000)
        watched = page.state.handle
        assert watched.last_terminal() is None, "the trainer wrote no ending of its own"
        status = train.status.text()
        assert "Training failed" in status and "killed by SIGKILL" in status, status
        assert "Retry continues from the last checkpoint" in status
        assert window.banner.level() == "error"
        assert "crashy failed" in window.banner.text() and "Retry it" in window.banner.text()
        assert train.pause_button.text() == "Retry" and train.pause_button.isEnabled()
        assert not train.start_over_button.isHidden() and not train.cancel_button.isEnabled()
        assert not train.isComplete(), "no comparing a run that did not finish"
        assert window.gallery_page.paths() == [earlier] and _digest(earlier) == before, "gallery untouched"

        # the application keeps running: Generate still works
        later = _generate_in_window(qtbot, window, seed=11)
        assert set(window.gallery_page.paths()) == {earlier, *later}

        # Retry starts the trainer again with --resume
        qtbot.mouseClick(train.pause_button, Qt.MouseButton.LeftButton)
        process = json.loads((watched.run_dir / "process.json").read_text())
        assert process["resume"] is True and process["pid"] != handle.pid and watched.alive()
        qtbot.waitUntil(lambda: _stepped_after_start(watched, 2), timeout=60_000)
        assert train.last_state == "running"
        assert train.start_over_button.isHidden() and train.pause_button.text() == "Pause"
        # pause (a checkpoint and a "cancelled" event), resume, and the resumed trainer dies before
        # its first event: the pause's ending must not pass for this attempt's
        qtbot.mouseClick(train.pause_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: train.last_state == "paused", timeout=60_000)
        assert watched.last_terminal().kind == "cancelled", "the pause wrote its ending"
        qtbot.mouseClick(train.pause_button, Qt.MouseButton.LeftButton)
        _kill(json.loads((watched.run_dir / "process.json").read_text())["pid"])
        qtbot.waitUntil(lambda: train.last_state == "failed", timeout=20_000)
        assert "killed by SIGKILL" in train.status.text() and watched.last_terminal() is None

        qtbot.mouseClick(train.start_over_button, Qt.MouseButton.LeftButton)
        assert page.wizard.currentId() == FOLDER and page.state.handle is None
        assert page.folder_step.folder_edit.text() == str(folder), "start over keeps the images folder"
        assert (watched.run_dir / "events.jsonl").is_file(), "the failed run's folder is kept"
        assert _digest(earlier) == before and all(p.is_file() for p in later)
    finally:
        for pid in {handle.pid, ft.attach(handle.run_dir).pid}:
            if pid is not None:
                _kill(pid)


def test_run_whose_trainer_vanished_is_failed_on_reopening(
    qtbot: QtBot, ui_home: Path, tmp_path: Path
) -> None:
    """The app was closed, then the trainer died (power loss, OOM killer): reopening shows the
    run as failed with the end of *this* attempt's log, not as running or paused."""
    import subprocess
    import sys

    from snapgen_app.progress import Event, encode_event

    folder = make_folder(tmp_path / "pictures")
    run_dir = ft.run_dir_for("vanished")
    run_dir.mkdir(parents=True)
    request = tiny_request(folder, tmp_path / "base", "vanished", steps=10)
    (run_dir / "request.json").write_text(json.dumps(request.to_dict()))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs a trainer
    (run_dir / "process.json").write_text(json.dumps({"pid": gone.pid, "resume": True}))
    events = [
        Event(kind="started", stage="finetune", total=10),
        Event(kind="progress", stage="finetune", step=1, total=10, data={"loss": {"total": 0.5}}),
        Event(kind="cancelled", stage="finetune", step=1, message="stopped"),  # an earlier pause
        Event(kind="started", stage="finetune", total=10),  # the resumed attempt that died
        Event(kind="progress", stage="finetune", step=2, total=10, data={"loss": {"total": 0.4}}),
    ]
    lines = "".join(encode_event(e) + "\n" for e in events)
    (run_dir / "events.jsonl").write_text(lines + '{"kind": "prog')  # killed mid-line
    (run_dir / "stderr.log").write_text(
        f"{ft.LAUNCH_MARK} (start)\ntraining_tools: error: stopped after step 1 with a checkpoint\n"
        f"{ft.LAUNCH_MARK} (resume)\nresumed from step-1\n"
        "Loading weights: 100%|##########| 39/39 [00:00<00:00, 41203.49it/s]\n"
        "caching latents of 3 images\n"
    )
    window = make_window(qtbot, ui_home)
    page, train = window.wizard_page, window.wizard_page.train_step
    assert page.wizard.currentId() == TRAIN and page.state.handle.name == "vanished"
    qtbot.waitUntil(lambda: train.last_state == "failed", timeout=5_000)
    status = train.status.text()
    assert "the trainer stopped without reporting an error" in status, status
    assert "resumed from step-1 / caching latents of 3 images" in status
    assert "stopped after step 1" not in status and "it/s" not in status, "only this attempt's log"
    assert train.plot.point_count() == 2 and train.pause_button.text() == "Retry"
    assert not train.start_over_button.isHidden() and "vanished failed" in window.banner.text()


def test_disk_full_while_generating_is_a_message(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    outputs = ui_home / "outputs"
    (earlier,) = _generate_in_window(qtbot, window, seed=5)
    before = _digest(earlier)

    real_fsync, refused = os.fsync, []

    def disk_full(fd: int) -> None:
        # only the image files run out of room: the kernel reports ENOSPC when the data is flushed
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(outputs)):
            refused.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    messages = collect_messages(window)
    _fill(window, seed=6, steps=2)
    window.generate_page.count_spin.setValue(2)
    qtbot.mouseClick(window.generate_page.generate_button, Qt.MouseButton.LeftButton)
    end = wait_for_end(qtbot, messages, window.controller.current_job.job_id)
    assert end.kind == "error" and refused, "the write really hit the full disk"
    banner = window.banner.text()
    assert window.banner.level() == "error" and "Generation failed: the disk is full" in banner, banner
    assert "free some space" in banner and str(outputs) in banner
    assert "Traceback" not in banner and "Errno" not in banner
    assert window.generate_page.status_label.text() == "Failed"
    assert _files(outputs) == [earlier.name], "no new image and no temp file is left"
    assert window.gallery_page.paths() == [earlier] and _digest(earlier) == before

    monkeypatch.setattr(os, "fsync", real_fsync)  # space was freed: the next job works
    window.generate_page.count_spin.setValue(1)
    (fresh,) = _generate_in_window(qtbot, window, seed=6)
    assert set(window.gallery_page.paths()) == {earlier, fresh} and _digest(earlier) == before
