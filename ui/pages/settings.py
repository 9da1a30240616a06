"""Settings: data and output folders, ONNX Runtime threads, default device; the theme follows the system."""

from __future__ import annotations

import os
from collections.abc import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from model_store.paths import HOME_ENV, store_home
from ui.app_settings import AppSettings
from ui.extras import available_devices

Notify = Callable[[str, str], None]


class SettingsPage(QWidget):
    """Edits AppSettings; ``saved`` fires after Save so the window can re-read folders and models."""

    saved = Signal()

    def __init__(self, settings: AppSettings, notify: Notify, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        self.notify = notify
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText(f"default: {store_home()}")
        self.output_edit = QLineEdit()
        self.training_python_edit = QLineEdit()
        self.training_python_edit.setPlaceholderText(
            "automatic: this Python when it has torch, else $SNAPGEN_TRAIN_PYTHON"
        )
        self.training_python_edit.setToolTip(
            'A Python with the training tools: pip install "snapgen-studio[train]" (see docs/packaging.md)'
        )
        self.threads_spin = QSpinBox()
        self.threads_spin.setRange(0, 256)
        self.threads_spin.setSpecialValueText(f"automatic ({os.cpu_count() or 1} cores)")
        self.device_combo = QComboBox()
        self.device_combo.addItem("auto (best available)", "auto")
        for choice in available_devices():
            self.device_combo.addItem(f"{choice.device} ({choice.provider})", choice.device)
        scheme = QGuiApplication.styleHints().colorScheme().name
        now = {"Dark": "dark", "Light": "light"}.get(scheme, "the system reports no preference: light")
        self.theme_label = QLabel(f"Follows the system (now: {now})")

        form = QFormLayout()
        form.addRow("Data folder (models, registry)", _with_browse(self.data_edit, self))
        form.addRow("Output folder (images)", _with_browse(self.output_edit, self))
        form.addRow("Training Python (fine-tuning)", self.training_python_edit)
        form.addRow("ONNX Runtime threads", self.threads_spin)
        form.addRow("Default device", self.device_combo)
        form.addRow("Theme", self.theme_label)
        self.env_note = QLabel()
        self.env_note.setWordWrap(True)
        save = QPushButton("Save")
        save.clicked.connect(self.save)
        revert = QPushButton("Revert")
        revert.clicked.connect(self.load)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(revert)
        buttons.addWidget(save)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.env_note)
        layout.addLayout(buttons)
        layout.addStretch(1)
        self.load()

    def load(self) -> None:
        """Show the stored values."""
        self.data_edit.setText(self.settings.data_dir_override)
        self.output_edit.setText(self.settings.output_dir_override)
        self.output_edit.setPlaceholderText(f"default: {store_home() / 'outputs'}")
        self.training_python_edit.setText(self.settings.training_python)
        self.threads_spin.setValue(self.settings.threads)
        index = self.device_combo.findData(self.settings.device)
        self.device_combo.setCurrentIndex(max(0, index))
        self.env_note.setText(
            f"In use now: data folder {store_home()}"
            + (f" (from ${HOME_ENV})" if os.environ.get(HOME_ENV) else "")
        )

    def save(self) -> None:
        """Store the values; a data folder takes effect at once for the service and model store."""
        self.settings.data_dir_override = self.data_edit.text().strip()
        self.settings.output_dir_override = self.output_edit.text().strip()
        self.settings.training_python = self.training_python_edit.text().strip()
        self.settings.threads = self.threads_spin.value()
        self.settings.device = self.device_combo.currentData() or "auto"
        self.settings.apply_data_dir()
        self.settings.qsettings.sync()
        self.load()
        self.notify("settings saved", "info")
        self.saved.emit()


def _with_browse(edit: QLineEdit, parent: QWidget) -> QWidget:
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(edit, 1)
    button = QPushButton("Browse…")

    def browse() -> None:
        folder = QFileDialog.getExistingDirectory(parent, "Choose a folder", edit.text())
        if folder:
            edit.setText(folder)

    button.clicked.connect(browse)
    row.addWidget(button, 0, Qt.AlignmentFlag.AlignRight)
    return box
