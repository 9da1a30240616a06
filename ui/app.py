"""``snapgen-studio``: start the Qt application.

Importing this module loads Qt, the service and the model store, never torch (tested in a
subprocess by tests/test_ui_isolation.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence

from PySide6.QtCore import QCoreApplication, QSettings
from PySide6.QtWidgets import QApplication

from ui.app_settings import APPLICATION, ORGANIZATION, AppSettings
from ui.main_window import MainWindow


def create_application(argv: Sequence[str] | None = None) -> QApplication:
    """The QApplication (reused when one exists), with organisation/application names for QSettings.

    The style is Fusion, which follows the system's light/dark colour scheme (Qt >= 6.5).
    """
    QCoreApplication.setOrganizationName(ORGANIZATION)
    QCoreApplication.setApplicationName(APPLICATION)
    existing = QApplication.instance()
    if isinstance(existing, QApplication):
        return existing
    app = QApplication(list(argv) if argv is not None else sys.argv)
    app.setStyle("Fusion")
    return app


def build_main_window(settings: QSettings | None = None) -> MainWindow:
    """Apply the stored data folder (so the service and model store see it), then build the window."""
    qsettings = settings if settings is not None else QSettings(ORGANIZATION, APPLICATION)
    AppSettings(qsettings).apply_data_dir()
    return MainWindow(qsettings)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(argv) if argv is not None else sys.argv
    if "--selftest" in args:
        return selftest([a for a in args if a != "--selftest"])
    app = create_application(argv)
    window = build_main_window()
    window.show()
    return app.exec()


def selftest(argv: Sequence[str]) -> int:
    """``snapgen-studio --selftest`` (packaging/build.py): build and show the main window offscreen
    (unless QT_QPA_PLATFORM says otherwise), run the event loop once, close it. Prints one line;
    returns 0, or 1 when the window did not show."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # headless CI and frozen-folder checks
    started = time.perf_counter()
    app = create_application(argv)
    window = build_main_window()
    window.show()
    app.processEvents()
    shown = window.isVisible()
    elapsed = time.perf_counter() - started
    window.close()
    app.processEvents()
    if not shown:
        print("selftest: FAILED: the main window did not show", file=sys.stderr)
        return 1
    print(f"selftest: ok (main window shown in {elapsed:.2f} s, platform {app.platformName()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
