"""The main window: pages, window state remembered in QSettings, About with versions and licences,
settings saved, and the GUI process never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from PySide6.QtCore import QSettings
from pytestqt.qtbot import QtBot
from ui_support import make_window

from ui.main_window import DEVICES, MODELS, PAGES, SETTINGS, WIZARD

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["ui_support"]  # fixtures: ui_home, tiny_bundle


def test_window_state_is_remembered(qtbot: QtBot, ui_home: Path, tmp_path: Path) -> None:
    ini = tmp_path / "state.ini"
    window = make_window(qtbot, ui_home, ini)
    assert window.nav.count() == len(PAGES)
    window.show_page(MODELS)
    window.resize(796, 640)  # inside the offscreen screen (800 x 800), which restoreGeometry clamps to
    qtbot.waitUntil(lambda: window.width() == 796)
    window.close()
    assert QSettings(str(ini), QSettings.Format.IniFormat).value("window/page") in (MODELS, str(MODELS))

    again = make_window(qtbot, ui_home, ini)
    assert again.current_page() == MODELS
    assert (again.width(), again.height()) == (796, 640)


def test_about_lists_versions_and_licences(qtbot: QtBot, ui_home: Path) -> None:
    import onnxruntime
    from PySide6.QtCore import qVersion

    window = make_window(qtbot, ui_home)
    about = window.show_about()
    assert about.isVisible() and not about.isModal()
    text = about.browser.toPlainText()
    for needle in (
        onnxruntime.__version__,
        qVersion(),
        "0.1.0",
        "MiniLM",
        "Apache-2.0",
        "Noto Color Emoji",
        "OFL-1.1",
    ):
        assert needle in text, needle


def test_wizard_and_devices_pages_are_live(qtbot: QtBot, ui_home: Path) -> None:
    from ui.pages.devices import DevicesPage
    from ui.pages.wizard import FOLDER, WizardPage

    window = make_window(qtbot, ui_home)
    window.show_page(WIZARD)
    assert window.stack.currentWidget() is window.wizard_page
    assert isinstance(window.wizard_page, WizardPage) and window.wizard_page.wizard.currentId() == FOLDER
    window.show_page(DEVICES)
    assert window.current_page() == DEVICES and isinstance(window.devices_page, DevicesPage)


def test_settings_save_output_folder_threads_device(qtbot: QtBot, ui_home: Path, tmp_path: Path) -> None:
    window = make_window(qtbot, ui_home)
    window.show_page(SETTINGS)
    page = window.settings_page
    page.output_edit.setText(str(tmp_path / "pictures"))
    page.threads_spin.setValue(1)
    page.device_combo.setCurrentIndex(page.device_combo.findData("cpu"))
    page.training_python_edit.setText(" /opt/train-env/bin/python ")
    page.save()
    assert window.settings.output_dir() == tmp_path / "pictures"
    assert window.gallery_page.folder == tmp_path / "pictures"
    assert window.settings.threads == 1 and window.settings.device == "cpu"
    # The wizard runs fine-tuning with the Python chosen here.
    assert window.wizard_page.training_python == "/opt/train-env/bin/python"
    assert window.banner.text() == "settings saved"


def test_a_data_folder_chosen_then_cleared_in_settings_takes_effect_at_once(
    qtbot: QtBot, ui_home: Path, tmp_path: Path
) -> None:
    from model_store.paths import store_home

    window = make_window(qtbot, ui_home)
    page = window.settings_page
    page.data_edit.setText(str(tmp_path / "elsewhere"))
    page.save()
    assert store_home() == tmp_path / "elsewhere"
    page.data_edit.setText("")
    page.save()
    assert store_home() == ui_home, "back to the folder in use before, without a restart"
    assert str(ui_home) in page.env_note.text()


def test_gui_never_imports_torch(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os, sys
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        os.environ["SNAPGEN_HOME"] = {str(tmp_path / "home")!r}
        from PySide6.QtCore import QSettings
        import ui.app
        app = ui.app.create_application([])
        window = ui.app.build_main_window(QSettings({str(tmp_path / "ui.ini")!r}, QSettings.Format.IniFormat))
        window.show()
        for index in range(window.stack.count()):
            window.show_page(index)
            app.processEvents()
        window.show_about()
        app.processEvents()
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        print("FORBIDDEN", bad)
        window.close()
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FORBIDDEN []" in done.stdout, done.stdout
