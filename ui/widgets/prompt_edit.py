"""The prompt box: plain text, Ctrl+Enter submits, Ctrl+Up/Down walks the prompt history."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QPlainTextEdit, QWidget

MAX_HISTORY = 100


class PromptEdit(QPlainTextEdit):
    """Emits ``submitted`` on Ctrl+Enter; ``history`` holds earlier prompts, newest last."""

    submitted = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setPlaceholderText(
            "Describe the image, e.g. 'a red apple on a blue background'  (Ctrl+Enter generates)"
        )
        self.setTabChangesFocus(True)
        self.history: list[str] = []
        self._cursor = 0  # index into history; len(history) means "the text being typed"
        self._draft = ""

    def prompt(self) -> str:
        return self.toPlainText()

    def set_history(self, prompts: list[str]) -> None:
        self.history = [p for p in prompts if p.strip()][-MAX_HISTORY:]
        self._cursor = len(self.history)

    def remember(self, prompt: str) -> None:
        """Append ``prompt`` to the history (moved to the end when already there)."""
        if not prompt.strip():
            return
        if prompt in self.history:
            self.history.remove(prompt)
        self.history.append(prompt)
        del self.history[:-MAX_HISTORY]
        self._cursor = len(self.history)

    def step_history(self, offset: int) -> None:
        """Show the previous (-1) or next (+1) prompt of the history."""
        if not self.history:
            return
        if self._cursor == len(self.history):
            self._draft = self.toPlainText()
        self._cursor = max(0, min(len(self.history), self._cursor + offset))
        text = self._draft if self._cursor == len(self.history) else self.history[self._cursor]
        self.setPlainText(text)
        self.moveCursor(self.textCursor().MoveOperation.End)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        ctrl = bool(event.modifiers() & Qt.KeyboardModifier.ControlModifier)
        if ctrl and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self.submitted.emit()
            return
        if ctrl and event.key() == Qt.Key.Key_Up:
            self.step_history(-1)
            return
        if ctrl and event.key() == Qt.Key.Key_Down:
            self.step_history(+1)
            return
        super().keyPressEvent(event)
