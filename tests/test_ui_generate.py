"""The generate screen driven through its real widgets: a tiny real bundle generates an image that
shows up in the gallery, cancel stops within one step, the queue reorders/removes, and every bad
input becomes a message in the window while the application keeps running."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot
from ui_support import (
    PROMPT,
    TINY_MODEL,
    collect_messages,
    install_tiny,
    make_window,
    wait_for_end,
)

from snapgen_app.api import StepEvent
from ui.controller import TaskMessage

pytest_plugins = ["ui_support"]  # fixtures: ui_home, tiny_bundle


def _fill(window, prompt: str = PROMPT, seed: int = 7, steps: int = 4) -> None:
    page = window.generate_page
    page.prompt_edit.setPlainText(prompt)
    page.seed_mode.setCurrentText("Fixed")
    page.seed_edit.setText(str(seed))
    page.steps_spin.setValue(steps)


def test_generate_shows_progress_preview_and_lands_in_gallery(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path
) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    page = window.generate_page
    assert page.model_combo.currentData() == TINY_MODEL
    assert page.precision_combo.findData("int8") >= 0 and page.precision_combo.findData("fp32") >= 0
    assert page.device_combo.findData("cpu") >= 0, "the CPU provider is always offered"
    messages = collect_messages(window)
    _fill(window, steps=4)
    page.count_spin.setValue(2)
    qtbot.mouseClick(page.generate_button, Qt.MouseButton.LeftButton)
    job = window.controller.current_job
    assert job is not None
    end = wait_for_end(qtbot, messages, job.job_id)
    assert end.kind == "finished", end.error
    steps = [
        StepEvent.from_event(m.event) for m in messages if m.kind == "event" and m.event.kind == "progress"
    ]
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert all(s.preview is not None for s in steps), "preview=True gives a live preview every step"
    assert page.progress_bar.value() == 4 and page.progress_bar.maximum() == 4
    assert not page.preview_label.pixmap().isNull()
    images = [Path(p) for p in end.result.images]
    assert len(images) == 2 and all(p.is_file() for p in images)
    assert images[0].parent == ui_home / "outputs"
    with Image.open(images[0]) as image:
        assert image.size == (32, 32) and "snapgen" in image.text
    assert set(window.gallery_page.paths()) == set(images)
    assert end.result.seeds == (7, 8)
    assert "2 image(s)" in page.status_label.text()
    assert page.prompt_edit.history[-1] == PROMPT


def test_ctrl_enter_generates_and_history_is_kept(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    page = window.generate_page
    messages = collect_messages(window)
    _fill(window, prompt="one small star below the moon", steps=1)
    qtbot.keyClick(page.prompt_edit, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert window.controller.current_job is not None, "Ctrl+Enter queued a job"
    wait_for_end(qtbot, messages, window.controller.current_job.job_id)
    page.prompt_edit.setPlainText("draft")
    qtbot.keyClick(page.prompt_edit, Qt.Key.Key_Up, Qt.KeyboardModifier.ControlModifier)
    assert page.prompt_edit.prompt() == "one small star below the moon"
    qtbot.keyClick(page.prompt_edit, Qt.Key.Key_Down, Qt.KeyboardModifier.ControlModifier)
    assert page.prompt_edit.prompt() == "draft"
    assert window.settings.prompt_history() == ["one small star below the moon"]


def test_cancel_stops_within_one_step(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    controller = window.controller
    worker_steps: list[int] = []

    def on_worker_message(message: TaskMessage) -> None:
        # runs on the worker thread at the moment of the report: cancel right after step 2
        if message.kind == "event" and message.event.kind == "progress":
            worker_steps.append(message.event.step)
            if message.event.step == 2:
                controller.cancel_current()

    controller.worker_signals.message.connect(on_worker_message, Qt.ConnectionType.DirectConnection)
    messages = collect_messages(window)
    _fill(window, steps=20)
    job_id = window.generate_page.submit()
    assert job_id is not None
    end = wait_for_end(qtbot, messages, job_id)
    assert end.kind == "cancelled"
    assert worker_steps == [1, 2], "no step runs after the cancel"
    assert not (ui_home / "outputs").exists() or not list((ui_home / "outputs").glob("*.png"))
    assert "cancelled after step 2" in window.banner.text()
    assert window.generate_page.cancel_button.isEnabled() is False
    assert not controller.busy


def test_cancel_button_and_queue_reorder_remove(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    page, controller = window.generate_page, window.controller
    messages = collect_messages(window)
    # Hold the first job inside its first step report until the queue was edited, so the
    # edits happen while it is really running.
    import threading

    release = threading.Event()

    def hold(message: TaskMessage) -> None:
        if message.kind == "event" and message.event.kind == "progress" and message.event.step == 1:
            release.wait(10)

    controller.worker_signals.message.connect(hold, Qt.ConnectionType.DirectConnection)
    ids = []
    for prompt in ("first", "second", "third", "fourth"):
        _fill(window, prompt=f"{prompt} apple", steps=3)
        ids.append(page.submit())
    running, *pending = ids
    assert controller.current_job.job_id == running
    assert [j.job_id for j in controller.pending_jobs] == pending
    assert page.queue_list.count() == 4
    # move "fourth" to the front, remove "third"
    page.queue_list.setCurrentRow(3)
    qtbot.mouseClick(page.up_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(page.up_button, Qt.MouseButton.LeftButton)
    assert [j.job_id for j in controller.pending_jobs] == [ids[3], ids[1], ids[2]]
    page.queue_list.setCurrentRow(3)
    qtbot.mouseClick(page.remove_button, Qt.MouseButton.LeftButton)
    assert [j.job_id for j in controller.pending_jobs] == [ids[3], ids[1]]
    qtbot.waitUntil(page.cancel_button.isEnabled, timeout=10_000)  # once its start reached the page
    qtbot.mouseClick(page.cancel_button, Qt.MouseButton.LeftButton)
    release.set()
    assert wait_for_end(qtbot, messages, running).kind == "cancelled"
    ends = [wait_for_end(qtbot, messages, i) for i in (ids[3], ids[1])]
    assert [e.kind for e in ends] == ["finished", "finished"]
    finished_order = [m.task_id for m in messages if m.kind == "finished"]
    assert finished_order == [ids[3], ids[1]], "the reordered queue ran in its new order"
    assert not any(m.task_id == ids[2] for m in messages), "the removed job never ran"


def test_empty_prompt_is_a_message(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    window.generate_page.prompt_edit.setPlainText("   ")
    qtbot.mouseClick(window.generate_page.generate_button, Qt.MouseButton.LeftButton)
    assert window.controller.current_job is None
    assert window.banner.isVisible() and window.banner.level() == "error"
    assert "prompt is empty" in window.banner.text()


def test_no_model_installed_is_a_message(qtbot: QtBot, ui_home: Path) -> None:
    window = make_window(qtbot, ui_home)
    assert window.generate_page.model_combo.currentData() == ""
    window.generate_page.prompt_edit.setPlainText(PROMPT)
    assert window.generate_page.submit() is None
    assert "no model is installed" in window.banner.text() and "Models page" in window.banner.text()
    assert window.models_page.table.rowCount() == 0


def test_model_failing_verification_is_a_message(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    folder = install_tiny(ui_home, tiny_bundle, name="damaged")
    with open(folder / "unet.fp32.onnx", "r+b") as handle:  # same size, different bytes
        handle.seek(40)
        byte = handle.read(1)
        handle.seek(40)
        handle.write(bytes([byte[0] ^ 0xFF]))
    window = make_window(qtbot, ui_home)
    messages = collect_messages(window)
    _fill(window)
    window.generate_page.precision_combo.setCurrentIndex(
        window.generate_page.precision_combo.findData("fp32")
    )
    job_id = window.generate_page.submit()
    end = wait_for_end(qtbot, messages, job_id)
    assert end.kind == "error"
    assert "failed verification" in window.banner.text() and "unet.fp32.onnx" in window.banner.text()
    assert window.banner.level() == "error"
    # the application keeps running: the next job is accepted
    assert window.generate_page.submit() is not None


@pytest.mark.parametrize(("field", "value", "needle"), [("width", 40, "40"), ("seed", "9" * 19, "seed")])
def test_generation_error_is_a_message(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path, field: str, value: object, needle: str
) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    _fill(window)
    page = window.generate_page
    if field == "width":
        # not a multiple of the model's stride (the size boxes step by it): refused before queueing,
        # not when the job's turn comes
        assert page.width_spin.singleStep() == page._stride and 40 % page._stride
        page.width_spin.setValue(int(value))
        assert page.submit() is None and not window.controller.pending_jobs
        assert f"is not a multiple of {page._stride}" in window.banner.text()
    else:
        page.seed_edit.setText(str(value))  # larger than the largest seed: refused before queueing
        assert page.submit() is None
    assert window.banner.level() == "error" and needle in window.banner.text()
    assert not list((ui_home / "outputs").glob("*.png")) if (ui_home / "outputs").exists() else True


def test_a_second_cancel_press_does_not_reach_the_next_job(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path
) -> None:
    """Cancel pressed twice for a job that takes a moment to stop: the second press must not
    cancel the job queued after it. The button stays off until the next job has started."""
    import threading

    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    page, controller = window.generate_page, window.controller
    messages = collect_messages(window)
    release = threading.Event()

    def hold(message: TaskMessage) -> None:  # the first job is slow to stop: held in its first step
        if message.kind == "event" and message.event.kind == "progress" and message.task_id == first:
            release.wait(10)

    controller.worker_signals.message.connect(hold, Qt.ConnectionType.DirectConnection)
    _fill(window, steps=3)
    first = page.submit()
    _fill(window, steps=2, seed=8)
    second = page.submit()
    assert first is not None and second is not None
    qtbot.waitUntil(lambda: page._started == first and page.cancel_button.isEnabled(), timeout=30_000)
    page.cancel()
    assert not page.cancel_button.isEnabled()
    page.cancel()  # the impatient second press, while the first job is still stopping
    release.set()
    assert wait_for_end(qtbot, messages, first).kind == "cancelled"
    assert wait_for_end(qtbot, messages, second).kind == "finished"
