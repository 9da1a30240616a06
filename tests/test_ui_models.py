"""The models page over the real model store: list with size/source/variants, verify (ok and a
damaged file), import a folder and a zip, remove with confirmation, download errors as messages."""

from __future__ import annotations

import shutil
from pathlib import Path

from pytestqt.qtbot import QtBot
from ui_support import (
    TINY_MODEL,
    collect_messages,
    install_tiny,
    make_window,
    registry_for,
    wait_for_end,
)

from ui.pages.models import COLUMNS

pytest_plugins = ["ui_support"]  # fixtures: ui_home, tiny_bundle


def _row(window, name: str) -> dict[str, str]:
    table = window.models_page.table
    for row in range(table.rowCount()):
        if table.item(row, 0).text() == name:
            return {column: table.item(row, i).text() for i, column in enumerate(COLUMNS)}
    raise AssertionError(f"{name} not listed")


def test_list_and_verify(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    install_tiny(ui_home, tiny_bundle)
    folder = install_tiny(ui_home, tiny_bundle, name="damaged")
    window = make_window(qtbot, ui_home)
    page = window.models_page
    row = _row(window, TINY_MODEL)
    assert row["Kind"] == "bundle" and row["Variants"] == "fp32, int8"
    assert row["Source"].startswith("import") and row["License"] == "Apache-2.0"
    assert row["Size"].endswith(("KB", "MB")) and row["Verification"] == "not checked"

    messages = collect_messages(window)
    assert page.select_name(TINY_MODEL)
    task = page.verify_selected()
    assert wait_for_end(qtbot, messages, task).kind == "finished"
    assert _row(window, TINY_MODEL)["Verification"].startswith("ok")
    assert any(m.kind == "event" and m.event.stage == "verify" for m in messages), "verify reports progress"

    (folder / "decoder.int8.onnx").write_bytes(b"garbage")
    assert page.select_name("damaged")
    task = page.verify_selected()
    assert wait_for_end(qtbot, messages, task).kind == "finished"
    assert _row(window, "damaged")["Verification"].startswith("FAILED")
    assert window.banner.level() == "error" and "decoder.int8.onnx" in window.banner.text()


def test_import_folder_and_zip_then_remove(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    window = make_window(qtbot, ui_home)
    page = window.models_page
    messages = collect_messages(window)
    assert window.generate_page.model_combo.currentData() == ""

    task = page.import_path(tiny_bundle)
    assert wait_for_end(qtbot, messages, task).kind == "finished"
    assert window.generate_page.model_combo.currentData() == TINY_MODEL, "the picker refreshed"

    archive = shutil.make_archive(str(tmp_path / "zipped"), "zip", tiny_bundle.parent, tiny_bundle.name)
    task = page.import_path(archive)
    end = wait_for_end(qtbot, messages, task)
    assert end.kind == "error" and "already installed" in window.banner.text(), "same name: refused, readable"

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    task = page.import_path(not_a_model)
    assert wait_for_end(qtbot, messages, task).kind == "error"
    assert "neither a runtime bundle nor a diffusers checkpoint" in window.banner.text()

    assert page.select_name(TINY_MODEL)
    page.confirm = lambda title, question: False
    assert page.remove_selected() is None
    page.confirm = lambda title, question: True
    task = page.remove_selected()
    assert wait_for_end(qtbot, messages, task).kind == "finished"
    assert registry_for(ui_home).names() == [] and page.table.rowCount() == 0
    assert window.generate_page.model_combo.currentData() == ""
    assert f"model {TINY_MODEL!r} is no longer installed" in window.banner.text(), window.banner.text()


def test_download_errors_are_messages(qtbot: QtBot, ui_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach the network from tests
    window = make_window(qtbot, ui_home)
    page = window.models_page
    messages = collect_messages(window)
    assert page.catalog_combo.count() >= 1
    page.repo_edit.setText("not a repo id!")
    task = page.download_clicked()
    assert wait_for_end(qtbot, messages, task).kind == "error"
    assert "is not a Hub repo id" in window.banner.text()
    assert page.download_button.isEnabled() and not page.stop_button.isEnabled()

    page.repo_edit.setText("someone/some-model")
    task = page.download_clicked()
    assert wait_for_end(qtbot, messages, task).kind == "error"
    assert window.banner.level() == "error" and "offline" in window.banner.text().lower()
