"""Typed access to the application's QSettings (organisation "SnapGen", application "SnapGen Studio").

The main window takes a QSettings instance so tests can point it at a temporary INI file.
"""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

from model_store.paths import HOME_ENV, store_home

# $SNAPGEN_HOME as it was before a Settings choice replaced it (empty: not replaced), so that
# clearing the choice goes back to it.
_REPLACED: list[str | None] = []

ORGANIZATION = "SnapGen"
APPLICATION = "SnapGen Studio"


def default_settings() -> QSettings:
    """The user's settings store (native format, per user)."""
    return QSettings(ORGANIZATION, APPLICATION)


class AppSettings:
    """Named, typed values over a QSettings."""

    def __init__(self, settings: QSettings) -> None:
        self.qsettings = settings

    # -- paths -------------------------------------------------------------------------------------

    @property
    def data_dir_override(self) -> str:
        """The data folder chosen in Settings ("" = the default, or $SNAPGEN_HOME)."""
        return str(self.qsettings.value("paths/data_dir", "") or "")

    @data_dir_override.setter
    def data_dir_override(self, value: str) -> None:
        self.qsettings.setValue("paths/data_dir", value)

    @property
    def output_dir_override(self) -> str:
        return str(self.qsettings.value("paths/output_dir", "") or "")

    @output_dir_override.setter
    def output_dir_override(self, value: str) -> None:
        self.qsettings.setValue("paths/output_dir", value)

    def output_dir(self) -> Path:
        """Where generated images go (and what the gallery shows)."""
        override = self.output_dir_override
        return Path(override).expanduser() if override else store_home() / "outputs"

    def apply_data_dir(self) -> None:
        """Make the service and model store use the chosen data folder (they read $SNAPGEN_HOME);
        with the choice cleared, the folder in use before it ($SNAPGEN_HOME as it was, else the
        default) is used again at once, not only after a restart."""
        if self.data_dir_override:
            if not _REPLACED:  # remember what the choice replaces, once
                _REPLACED.append(os.environ.get(HOME_ENV))
            os.environ[HOME_ENV] = str(Path(self.data_dir_override).expanduser())
        elif _REPLACED:
            before = _REPLACED.pop()
            if before is None:
                os.environ.pop(HOME_ENV, None)
            else:
                os.environ[HOME_ENV] = before

    # -- runtime -----------------------------------------------------------------------------------

    @property
    def threads(self) -> int:
        """ONNX Runtime intra-op threads; 0 = its default."""
        try:
            return max(0, int(self.qsettings.value("runtime/threads", 0)))
        except (TypeError, ValueError):
            return 0

    @threads.setter
    def threads(self, value: int) -> None:
        self.qsettings.setValue("runtime/threads", int(value))

    @property
    def training_python(self) -> str:
        """The Python with the `train` extra that runs fine-tuning ("" = find it: this one when it
        has torch, else $SNAPGEN_TRAIN_PYTHON)."""
        return str(self.qsettings.value("training/python", "") or "")

    @training_python.setter
    def training_python(self, value: str) -> None:
        self.qsettings.setValue("training/python", value)

    @property
    def device(self) -> str:
        return str(self.qsettings.value("runtime/device", "auto") or "auto")

    @device.setter
    def device(self, value: str) -> None:
        self.qsettings.setValue("runtime/device", value)

    # -- prompt history and window -----------------------------------------------------------------

    def prompt_history(self) -> list[str]:
        value = self.qsettings.value("generate/history", [])
        if isinstance(value, str):  # QSettings returns a lone string for one-element lists
            return [value]
        return [str(v) for v in value or []]

    def set_prompt_history(self, prompts: list[str]) -> None:
        self.qsettings.setValue("generate/history", list(prompts))

    def window_geometry(self) -> QByteArray | None:
        value = self.qsettings.value("window/geometry")
        return value if isinstance(value, QByteArray) else None

    def window_state(self) -> QByteArray | None:
        value = self.qsettings.value("window/state")
        return value if isinstance(value, QByteArray) else None

    def save_window(self, geometry: QByteArray, state: QByteArray, page: int) -> None:
        self.qsettings.setValue("window/geometry", geometry)
        self.qsettings.setValue("window/state", state)
        self.qsettings.setValue("window/page", page)
        self.qsettings.sync()

    def last_page(self) -> int:
        try:
            return int(self.qsettings.value("window/page", 0))
        except (TypeError, ValueError):
            return 0
