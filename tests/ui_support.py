"""Shared helpers for the Qt tests (tests/test_ui_*.py): offscreen Qt, a temporary data folder,
QSettings in a temporary INI file, and the tiny real bundle from test_runtime_fixtures.

Import the fixtures you use into the test module (pytest finds fixtures by module namespace).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

from pathlib import Path

import pytest
from pytestqt.qtbot import QtBot
from test_runtime_fixtures import build_bundle

from model_store.registry import ModelSource, Registry
from ui.controller import TaskMessage
from ui.main_window import MainWindow

TINY_MODEL = "tiny-test"
PROMPT = "a red apple on a blue background"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny real bundle (fp32 + int8) shared by every UI test; copied on install."""
    return build_bundle(
        tmp_path_factory.mktemp("ui-bundles") / TINY_MODEL, name=TINY_MODEL, precisions=("fp32", "int8")
    )


@pytest.fixture
def ui_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data folder ($SNAPGEN_HOME) and trash ($XDG_DATA_HOME) for one test."""
    home = tmp_path / "home"
    home.mkdir()
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("SNAPGEN_HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    return home


def registry_for(home: Path) -> Registry:
    """The registry of ``home`` without the packaged built-in models (tests control every model)."""
    return Registry(home, builtin_dir=home.parent / "no-builtins")


def install_tiny(home: Path, bundle: Path, name: str = TINY_MODEL) -> Path:
    """Install a copy of the tiny bundle as ``name``; returns its installed folder."""
    model = registry_for(home).install(bundle, name, source=ModelSource(type="import", request=str(bundle)))
    return model.path


def make_window(qtbot: QtBot, home: Path, settings_file: Path | None = None) -> MainWindow:
    """A MainWindow on ``home`` with its QSettings in a temporary INI file."""
    from PySide6.QtCore import QSettings

    ini = settings_file if settings_file is not None else home.parent / "ui.ini"
    settings = QSettings(str(ini), QSettings.Format.IniFormat)
    window = MainWindow(settings, registry=lambda: registry_for(home))
    qtbot.addWidget(window)
    window.show()
    return window


def collect_messages(window: MainWindow) -> list[TaskMessage]:
    """Every TaskMessage the window's controller re-emits from now on (GUI thread)."""
    messages: list[TaskMessage] = []
    window.controller.message.connect(messages.append)
    return messages


def wait_for_end(
    qtbot: QtBot, messages: list[TaskMessage], task_id: int, timeout: int = 20000
) -> TaskMessage:
    """Wait for the terminal message of ``task_id`` and return it."""

    def done() -> bool:
        return any(m.task_id == task_id and m.is_terminal for m in messages)

    qtbot.waitUntil(done, timeout=timeout)
    return next(m for m in messages if m.task_id == task_id and m.is_terminal)
