"""The distillation wizard end to end: a real tiny fine-tune (subprocess trainer) on a generated
folder from a tiny base checkpoint built here, the comparison with the base, export (int8 + fp32)
and registration into the model picker; reattaching after the window closes; cancel, resume and
pause; a folder without images gives a message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from PySide6.QtWidgets import QLabel
from pytestqt.qtbot import QtBot
from ui_support import make_window, registry_for

from snapgen_app import service
from ui.main_window import WIZARD
from ui.pages.wizard import CAPTIONS, COMPARE, FOLDER, MODEL, REGISTER, SETTINGS, TRAIN

pytest_plugins = ["ui_support"]  # fixtures: ui_home

ft = service.finetune
FAST_EXPORT = ft.ExportSettings(
    precisions=("int8", "fp32"), calib_prompts=1, calib_steps=2, exporter="torchscript"
)
FAST_BASE_EXPORT = ft.ExportSettings(
    precisions=("fp32",), calib_prompts=1, calib_steps=2, exporter="torchscript"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded SnapGen checkpoint (unet/ + autoencoder/ + text_conditioner/ over a 2-layer
    BERT), the layout the trainer writes and `snapgen export` reads."""
    import torch
    from test_export import tiny_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tiny_checkpoint(tmp_path_factory.mktemp("base"))
    finally:
        torch.set_num_threads(threads)


def make_folder(folder: Path) -> Path:
    """Three 32 px solid-colour squares; two have captions, ``green_square.png`` has none."""
    folder.mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}_square.png")
        if name != "green":
            (folder / f"{name}_square.txt").write_text(f"a {name} square")
    (folder / "notes.md").write_text("not an image")
    return folder


def tiny_request(folder: Path, base: Path, name: str, steps: int) -> object:
    return ft.FineTuneRequest(
        images_dir=str(folder),
        base_model=str(base),
        name=name,
        steps=steps,
        lora_rank=4,
        resolution=32,
        batch_size=2,
        learning_rate=1e-3,
        sample_prompts=("a red square",),
        sample_seeds=(0,),
        sample_steps=4,
        cpu_threads=1,
    )


@pytest.fixture(autouse=True)
def _one_thread_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer and exporter subprocesses share 2 cores


def test_wizard_fine_tunes_compares_and_registers(
    qtbot: QtBot, ui_home: Path, tmp_path: Path, base_checkpoint: Path
) -> None:
    folder = make_folder(tmp_path / "pictures")
    window = make_window(qtbot, ui_home)
    window.show_page(WIZARD)
    page = window.wizard_page
    page.export_settings, page.base_export_settings, page.cpu_threads = FAST_EXPORT, FAST_BASE_EXPORT, 1
    wizard = page.wizard
    assert wizard.currentId() == FOLDER

    page.folder_step.folder_edit.setText(str(folder))
    wizard.next()
    assert wizard.currentId() == CAPTIONS
    captions = page.state.captions
    assert captions == {
        "blue_square.png": "a blue square",
        "green_square.png": "green square",  # proposed from the file name
        "red_square.png": "a red square",
    }
    assert page.captions_step.table.item(1, 2).text() == "proposed"
    assert page.captions_step.set_caption("green_square.png", "a green square")
    wizard.next()

    assert wizard.currentId() == MODEL
    page.model_step.add_base_folder(str(base_checkpoint))
    page.model_step.name_edit.setText("my-style")
    wizard.next()

    assert wizard.currentId() == SETTINGS
    step = page.settings_step
    step.steps_spin.setValue(4)
    step.rank_spin.setValue(4)
    step.resolution_spin.setValue(32)
    step.batch_spin.setValue(2)
    step.lr_spin.setValue(0.001)
    step.prompts_edit.setText("a red square")
    step.seeds_edit.setText("0")
    step.sample_steps_spin.setValue(4)
    assert not step.isComplete(), "no estimate yet: Start training is disabled"
    step.resolution_spin.setValue(2048)
    step.batch_spin.setValue(256)
    step.run_estimate()
    qtbot.waitUntil(lambda: step.estimate_button.isEnabled(), timeout=120_000)
    assert "Refused" in step.estimate_label.text() and not step.isComplete()
    assert window.banner.level() == "error" and "GiB are available" in window.banner.text()
    step.resolution_spin.setValue(32)
    step.batch_spin.setValue(2)
    step.run_estimate()
    qtbot.waitUntil(
        lambda: page.state.estimate is not None or "Refused" in step.estimate_label.text(), timeout=120_000
    )
    assert page.state.estimate is not None, step.estimate_label.text()
    assert page.state.estimate.memory_gib > 0 and "GiB of memory (fits" in step.estimate_label.text()
    assert step.isComplete()
    step.steps_spin.setValue(5)
    assert not step.isComplete(), "the estimate belongs to other settings"
    step.steps_spin.setValue(4)
    wizard.next()

    assert wizard.currentId() == TRAIN
    handle = page.state.handle
    assert handle.alive() or handle.state() in ("finished", "failed")
    train = page.train_step
    qtbot.waitUntil(lambda: train.last_state in ("finished", "failed"), timeout=180_000)
    assert train.last_state == "finished", handle.failure()
    assert train.plot.point_count() == 4 and "kd_out" in train.plot.series
    assert train.sample_count() >= 1 and train.progress.value() == 4
    dataset = handle.run_dir / "dataset"
    assert (dataset / "green_square.txt").read_text().strip() == "a green square", "edited captions are used"
    assert not (folder / "green_square.txt").exists(), "the user's folder is left as it is"

    wizard.next()
    assert wizard.currentId() == COMPARE
    compare = page.compare_step
    qtbot.waitUntil(lambda: compare.done or "failed" in compare.status.text(), timeout=300_000)
    assert compare.done, compare.status.text()
    ((prompt, seed, base_png, tuned_png),) = page.state.comparison
    assert (prompt, seed) == ("a red square", 0)
    base_meta = service.read_png_request(base_png)
    tuned_meta = service.read_png_request(tuned_png)
    assert (base_meta.seed, base_meta.prompt) == (tuned_meta.seed, tuned_meta.prompt) == (0, "a red square")
    assert base_meta.model != tuned_meta.model
    labels = [w.text() for w in compare.findChildren(QLabel)]
    assert any("changed: mean |Δ|" in text for text in labels), (
        "each row says how much fine-tuning changed it"
    )
    manifest = json.loads((handle.bundle_dir / "bundle.json").read_text())
    assert set(manifest["variants"]) == {"int8", "fp32"}

    wizard.next()
    assert wizard.currentId() == REGISTER
    assert "my-style" not in [
        window.generate_page.model_combo.itemData(i) for i in range(window.generate_page.model_combo.count())
    ]
    page.register_step.register()
    qtbot.waitUntil(
        lambda: page.state.registered is not None or "Not registered" in page.register_step.status.text(),
        timeout=60_000,
    )
    assert page.state.registered is not None, page.register_step.status.text()
    picker = window.generate_page.model_combo
    assert "my-style" in [picker.itemData(i) for i in range(picker.count())], "the picker refreshed"
    model = registry_for(ui_home).get("my-style")
    assert model is not None and model.source.type == "trained" and set(model.variants) == {"fp32", "int8"}
    assert model.source.request["steps"] == 4 and model.source.request["lora_rank"] == 4
    assert "registered" in window.banner.text()


def test_run_survives_the_window_and_reattaches_cancel_resume_pause(
    qtbot: QtBot, ui_home: Path, tmp_path: Path, base_checkpoint: Path
) -> None:
    folder = make_folder(tmp_path / "pictures")
    registry = registry_for(ui_home)
    handle = ft.start(tiny_request(folder, base_checkpoint, "long-run", steps=100_000), registry=registry)
    try:
        window = make_window(qtbot, ui_home)
        page = window.wizard_page
        assert page.wizard.currentId() == TRAIN and page.state.handle.name == "long-run", "reattached at once"
        qtbot.waitUntil(lambda: page.train_step.plot.point_count() >= 2, timeout=120_000)
        window.close()
        assert handle.alive(), "closing the window leaves the run going"

        again = make_window(qtbot, ui_home)
        page = again.wizard_page
        assert page.wizard.currentId() == TRAIN
        seen = page.train_step.plot.point_count()
        assert seen >= 2, "the reattached page read the history from the start"
        qtbot.waitUntil(lambda: page.train_step.plot.point_count() > seen, timeout=60_000)

        page.train_step.cancel_button.click()
        qtbot.waitUntil(lambda: page.train_step.last_state == "cancelled", timeout=60_000)
        assert not handle.alive()
        stopped = page.state.handle
        assert stopped.last_terminal().kind == "cancelled"
        assert list((stopped.train_dir / "checkpoints").glob("step-*")), "SIGTERM wrote a checkpoint"
        steps_done = max(step for step, _ in stopped.losses())
        assert page.train_step.pause_button.text() == "Resume"

        page.train_step.pause_button.click()  # Resume: --resume continues from the checkpoint
        qtbot.waitUntil(lambda: page.train_step.plot.point_count() > steps_done + 1, timeout=120_000)
        resumed = [e for e in stopped.history if e.kind == "log" and "resumed from" in e.message]
        assert resumed, "the trainer resumed from its checkpoint"
        page.train_step.pause_button.click()  # Pause
        qtbot.waitUntil(lambda: page.train_step.last_state == "paused", timeout=60_000)
        assert (stopped.run_dir / "paused").exists() and not stopped.alive()
    finally:
        if handle.alive() and handle.pid is not None:
            os.killpg(handle.pid, 9)


def test_folder_without_images_is_a_message(qtbot: QtBot, ui_home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-pictures"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing to see")
    window = make_window(qtbot, ui_home)
    page = window.wizard_page
    page.folder_step.folder_edit.setText(str(empty))
    page.wizard.next()
    assert page.wizard.currentId() == FOLDER, "the wizard stays on the folder step"
    assert window.banner.level() == "error" and "has no images" in window.banner.text()
    assert "Cannot use this folder" in page.folder_step.result_label.text()

    page.folder_step.folder_edit.setText(str(tmp_path / "missing"))
    page.wizard.next()
    assert page.wizard.currentId() == FOLDER and "is not a folder" in window.banner.text()


def test_a_run_that_cannot_start_leaves_no_folder_to_block_its_name(
    ui_home: Path, tmp_path: Path, base_checkpoint: Path
) -> None:
    """The trainer cannot be started (here: a training Python without its execute bit; in life also
    a full disk while the run folder is written): one TrainingError, and no half-written run folder
    that would make every retry fail with "a run named ... already exists"."""
    from snapgen_app.errors import TrainingError

    folder = make_folder(tmp_path / "pictures")
    not_runnable = tmp_path / "python"
    not_runnable.write_text("#!/bin/sh\n")
    not_runnable.chmod(0o644)
    request = tiny_request(folder, base_checkpoint, "blocked", steps=10)
    for _ in range(2):  # the retry meets the same cause again, not the leftover folder
        with pytest.raises(TrainingError, match="could not start the run 'blocked'"):
            ft.start(request, python=str(not_runnable), registry=registry_for(ui_home))
        assert not ft.run_dir_for("blocked").exists()


def test_a_new_run_drops_the_last_runs_comparison_and_its_late_results(qtbot: QtBot, ui_home: Path) -> None:
    """New run while the last run's comparison is still working: that task is cancelled and what it
    returns later is not delivered into the new run's state; no rows of the old grid stay."""
    import threading

    window = make_window(qtbot, ui_home)
    page = window.wizard_page
    page.compare_step.grid.addWidget(QLabel("a row of the last run"), 1, 0)
    release = threading.Event()
    delivered: list[object] = []

    def body(report: object, token: object) -> str:
        release.wait(10)
        return "the last run's comparison"

    page.compare_step._task = page.run("compare", body, delivered.append)
    step = page.settings_step  # an estimate was running too: its button must come back
    step.estimate_button.setEnabled(False)
    step._task = page.run("estimate", body, delivered.append)
    page.new_run()
    release.set()
    qtbot.waitUntil(lambda: not page.controller.running_tasks(), timeout=10_000)
    qtbot.wait(50)  # let a late message reach the page, if it were still listening
    assert delivered == []
    assert page.compare_step.grid.count() == 0 and page.compare_step._task is None
    assert page.state.comparison == [] and not page.compare_step.done
    assert step.estimate_button.isEnabled() and step._task is None
