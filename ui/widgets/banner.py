"""A non-modal message strip at the top of the window: errors and notices never block the app.

Tests read ``banner.text()`` / ``banner.level()`` / ``banner.isVisibleTo(window)`` instead of
waiting on a modal dialog.
"""

from __future__ import annotations

from typing import Literal

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QToolButton, QWidget

Level = Literal["info", "warning", "error"]
_COLOURS: dict[str, tuple[str, str]] = {
    "info": ("#e8f0fe", "#1a3d7c"),
    "warning": ("#fff4e0", "#7a4a00"),
    "error": ("#fde8e8", "#8a1c1c"),
}


class MessageBanner(QFrame):
    """One message at a time with a level and a close button; ``history`` keeps every message shown."""

    closed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("messageBanner")
        self._label = QLabel(self)
        self._label.setWordWrap(True)
        self._label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QToolButton(self)
        close.setText("✕")
        close.setAutoRaise(True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.dismiss)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 6, 6, 6)
        layout.addWidget(self._label, 1)
        layout.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self._level: Level = "info"
        self.history: list[tuple[Level, str]] = []
        self.hide()

    def show_message(self, text: str, level: Level = "info") -> None:
        """Show ``text`` (replacing the previous message)."""
        self._level = level
        self.history.append((level, text))
        background, foreground = _COLOURS[level]
        self.setStyleSheet(
            f"#messageBanner {{ background: {background}; border: 1px solid {foreground}; border-radius: 4px; }}"
            f" #messageBanner QLabel {{ color: {foreground}; }}"
        )
        prefix = {"info": "", "warning": "Warning: ", "error": "Error: "}[level]
        self._label.setText(prefix + text)
        self.show()

    def text(self) -> str:
        return self._label.text()

    def level(self) -> Level:
        return self._level

    def dismiss(self) -> None:
        self.hide()
        self.closed.emit()
