"""The device page: saved targets listed, bad targets and missing devices as messages, and a real
profile over SSH (the sshd fixture of test_devices_ssh) shown per component and per operator, then
a second run compared side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pytestqt.qtbot import QtBot
from ui_support import TINY_MODEL, collect_messages, install_tiny, make_window, wait_for_end

from snapgen_app import service
from ui.main_window import DEVICES

pytest_plugins = ["ui_support"]  # fixtures: ui_home, tiny_bundle

pytest.importorskip("paramiko")
import test_devices_ssh as ssh_helpers  # noqa: E402
from test_devices_ssh import Sshd  # noqa: E402

sshd = ssh_helpers.sshd  # the module-scoped real-sshd fixture, shared rather than copied


def _rows(table) -> list[list[str]]:
    return [[table.item(r, c).text() for c in range(table.columnCount())] for r in range(table.rowCount())]


def test_lists_saved_targets_and_reports_bad_ones(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    install_tiny(ui_home, tiny_bundle)
    service.add_device_target("ssh:pi@192.0.2.7:2222")
    window = make_window(qtbot, ui_home)
    page = window.devices_page
    window.show_page(DEVICES)  # the first show lists the devices on a worker
    qtbot.waitUntil(lambda: page.device_table.rowCount() >= 1, timeout=20_000)
    row = next(r for r in _rows(page.device_table) if r[0] == "ssh:pi@192.0.2.7:2222")
    assert row[1:3] == ["ssh", "saved"]
    assert page.model_combo.currentData() == TINY_MODEL

    page.target_edit.setText("telnet:box")
    assert page.add_target() is None
    assert window.banner.level() == "error" and "Cannot add the target" in window.banner.text()

    messages = collect_messages(window)
    task = page.profile("ssh:nobody@127.0.0.1:1")  # nothing listens on port 1
    assert wait_for_end(qtbot, messages, task, timeout=60_000).kind == "error"
    assert window.banner.level() == "error" and "Profile failed" in window.banner.text()
    assert "127.0.0.1" in window.banner.text()
    assert page.profile_button.isEnabled() and not page.cancel_button.isEnabled()
    assert page.results == []


def test_profile_over_ssh_shows_components_operators_and_compares(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path, sshd: Sshd
) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    window.show_page(DEVICES)
    page = window.devices_page
    page.target_edit.setText(sshd.target)
    page.key_edit.setText(str(sshd.key))
    page.python_edit.setText(sys.executable)
    page.remote_dir_edit.setText(str(sshd.workdir))
    target = page.add_target()
    assert target == sshd.target
    qtbot.waitUntil(lambda: page.select_target(sshd.target), timeout=20_000)

    messages = collect_messages(window)
    page.runs_spin.setValue(3)
    page.threads_spin.setValue(1)
    page.precision_combo.setCurrentText("fp32")
    end = wait_for_end(qtbot, messages, page.profile_clicked(), timeout=180_000)
    assert end.kind == "finished", window.banner.text()
    assert any(m.kind == "event" and m.task_id == end.task_id for m in messages), "progress was reported"
    components = _rows(page.component_table)
    assert [r[0].split(" (")[1].rstrip(")") for r in components] == ["text_encoder", "unet", "decoder"]
    for row in components:
        assert float(row[2]) > 0 and float(row[3]) > 0, row  # first run and warm p50 in ms
        assert float(row[6]) > 0  # peak memory MiB
    assert page.op_table.rowCount() > 0 and "per image" in page.summary.text()

    page.precision_combo.setCurrentText("int8")
    end = wait_for_end(qtbot, messages, page.profile_clicked(), timeout=180_000)
    assert end.kind == "finished", window.banner.text()
    assert page.runs_list.count() == 2
    rows = page.compare_selected()
    assert len(rows) == 4 and rows[-1].name.startswith("total")
    table = _rows(page.compare_table)
    assert table[1][0].startswith("unet") and table[1][3].endswith("×")
    assert "fp32" in page.compare_note.text() and "int8" in page.compare_note.text()
