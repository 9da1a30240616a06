"""The gallery: every PNG in the outputs folder (so it survives restarts), newest first.

Full view, open folder, copy, delete to the trash, and "reuse settings" (restores the generate
fields from the PNG's metadata).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QFile, QSize, Qt, QUrl, Signal, Slot
from PySide6.QtGui import QDesktopServices, QGuiApplication, QIcon, QImage
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from snapgen_app.errors import SnapGenError
from ui.extras import png_text
from ui.widgets.image_view import ImageDialog, scaled_pixmap

THUMBNAIL = 128
Confirm = Callable[[str, str], bool]  # (title, question) -> yes?
Notify = Callable[[str, str], None]


def ask(parent: QWidget, title: str, question: str) -> bool:
    """The default confirmation: a Yes/No message box."""
    answer = QMessageBox.question(parent, title, question)
    return answer == QMessageBox.StandardButton.Yes


class GalleryPage(QWidget):
    """Thumbnails of ``folder``'s PNGs. ``reuseRequested(path)`` asks the window to restore settings."""

    reuseRequested = Signal(str)

    def __init__(self, folder: Callable[[], Path], notify: Notify, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._folder = folder
        self.notify = notify
        self.confirm: Confirm = lambda title, question: ask(self, title, question)
        self.open_url: Callable[[QUrl], bool] = QDesktopServices.openUrl
        self._viewers: list[ImageDialog] = []

        self.list = QListWidget()
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
        self.list.setGridSize(QSize(THUMBNAIL + 24, THUMBNAIL + 28))
        self.list.setResizeMode(QListView.ResizeMode.Adjust)
        self.list.setMovement(QListView.Movement.Static)
        self.list.setSelectionMode(QListWidget.SelectionMode.ExtendedSelection)
        self.list.setUniformItemSizes(True)
        self.list.setWordWrap(False)
        self.list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.list.itemDoubleClicked.connect(lambda _item: self.view_selected())
        self.list.currentItemChanged.connect(lambda *_: self._show_details())

        self.details = QLabel("Select an image to see its settings.")
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details.setAlignment(Qt.AlignmentFlag.AlignTop)
        self.details.setMinimumWidth(260)
        self.details.setMaximumWidth(340)

        buttons = QHBoxLayout()
        self.view_button = self._button("View", self.view_selected, buttons)
        self.reuse_button = self._button("Reuse settings", self.reuse_selected, buttons)
        self.copy_button = self._button("Copy", self.copy_selected, buttons)
        self.folder_button = self._button("Open folder", self.open_folder, buttons)
        self.delete_button = self._button("Delete", self.delete_selected, buttons)
        self.refresh_button = self._button("Refresh", self.refresh, buttons)
        buttons.addStretch(1)
        self.count_label = QLabel()
        buttons.addWidget(self.count_label)

        body = QHBoxLayout()
        body.addWidget(self.list, 1)
        body.addWidget(self.details)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addLayout(body, 1)
        self.refresh()

    def _button(self, text: str, slot: Callable[[], object], row: QHBoxLayout) -> QPushButton:
        button = QPushButton(text)
        button.clicked.connect(lambda: slot())
        row.addWidget(button)
        return button

    @property
    def folder(self) -> Path:
        return self._folder()

    # -- contents ------------------------------------------------------------------------------------

    def paths(self) -> list[Path]:
        """The images shown, in order."""
        return [Path(self.list.item(i).data(Qt.ItemDataRole.UserRole)) for i in range(self.list.count())]

    @Slot()
    def refresh(self) -> None:
        """Rescan the outputs folder (newest first)."""
        self.list.clear()
        for path in _pngs_newest_first(self.folder):
            self._add_item(path, at_top=False)
        self._update_count()

    @Slot(list)
    def add_images(self, paths: list[str]) -> None:
        """Put freshly generated images first (images written elsewhere are shown too)."""
        known = {str(p) for p in self.paths()}
        for path in reversed(paths):
            if str(Path(path)) not in known:
                self._add_item(Path(path), at_top=True)
        self._update_count()
        if paths:
            self.list.setCurrentRow(0)

    def _add_item(self, path: Path, *, at_top: bool) -> None:
        image = QImage(str(path))
        item = QListWidgetItem(path.stem)
        item.setData(Qt.ItemDataRole.UserRole, str(path))
        item.setToolTip(str(path))
        if not image.isNull():
            item.setIcon(QIcon(scaled_pixmap(image, THUMBNAIL)))
        if at_top:
            self.list.insertItem(0, item)
        else:
            self.list.addItem(item)

    def _update_count(self) -> None:
        # the folder goes in the tooltip: a long path must not widen the window's minimum size
        self.count_label.setText(f"{self.list.count()} image(s)")
        self.count_label.setToolTip(str(self.folder))

    def selected_paths(self) -> list[Path]:
        return [Path(item.data(Qt.ItemDataRole.UserRole)) for item in self.list.selectedItems()]

    def current_path(self) -> Path | None:
        item = self.list.currentItem()
        return Path(item.data(Qt.ItemDataRole.UserRole)) if item is not None else None

    def select_path(self, path: str | Path) -> bool:
        for row in range(self.list.count()):
            if Path(self.list.item(row).data(Qt.ItemDataRole.UserRole)) == Path(path):
                self.list.setCurrentRow(row)
                return True
        return False

    def _show_details(self) -> None:
        path = self.current_path()
        if path is None:
            self.details.setText("Select an image to see its settings.")
            return
        try:
            text = png_text(path)
        except SnapGenError as exc:
            self.details.setText(str(exc))
            return
        keys = ("prompt", "model", "seed", "steps", "size", "precision", "provider", "version")
        rows = [f"<b>{k}</b>: {_escape(text[k])}" for k in keys if k in text]
        self.details.setText(
            f"<b>{_escape(path.name)}</b><br>" + ("<br>".join(rows) or "no SnapGen settings")
        )

    # -- actions -------------------------------------------------------------------------------------

    def view_selected(self) -> None:
        path = self.current_path()
        if path is None:
            return
        viewer = ImageDialog(path, self)  # deletes itself when closed
        viewer.destroyed.connect(lambda _=None, v=viewer: self._forget_viewer(v))
        self._viewers.append(viewer)
        viewer.show()  # non-modal: the gallery stays usable

    def _forget_viewer(self, viewer: ImageDialog) -> None:
        self._viewers = [v for v in self._viewers if v is not viewer]

    def reuse_selected(self) -> None:
        path = self.current_path()
        if path is None:
            self.notify("select an image first", "info")
            return
        self.reuseRequested.emit(str(path))

    def copy_selected(self) -> None:
        path = self.current_path()
        if path is None:
            return
        image = QImage(str(path))
        if image.isNull():
            self.notify(f"cannot read {path.name}", "error")
            return
        QGuiApplication.clipboard().setImage(image)
        self.notify(f"copied {path.name} to the clipboard", "info")

    def open_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.open_url(QUrl.fromLocalFile(str(self.folder)))

    def delete_selected(self) -> list[Path]:
        """Move the selected images to the trash after confirmation; returns those moved."""
        paths = self.selected_paths()
        if not paths:
            return []
        names = ", ".join(p.name for p in paths[:3]) + ("…" if len(paths) > 3 else "")
        if not self.confirm("Move to trash", f"Move {len(paths)} image(s) to the trash?\n{names}"):
            return []
        moved, failed = [], []
        for path in paths:  # a file already deleted elsewhere (a file manager) only leaves the list
            (moved if QFile(str(path)).moveToTrash() or not path.exists() else failed).append(path)
        for row in reversed(range(self.list.count())):
            if Path(self.list.item(row).data(Qt.ItemDataRole.UserRole)) in moved:
                self.list.takeItem(row)
        self._update_count()
        if failed:
            self.notify(
                f"could not move {', '.join(p.name for p in failed)} to the trash (no trash on this disk?); "
                "the files are unchanged",
                "error",
            )
        return moved


def _pngs_newest_first(folder: Path) -> list[Path]:
    """The PNGs of ``folder``, newest first; a file removed while listing, a dangling link or an
    unreadable folder is left out rather than failing the gallery (it is built at start-up)."""
    found: list[tuple[float, str, Path]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.lower().endswith(".png"):
                    continue
                try:
                    if entry.is_file():
                        found.append((entry.stat().st_mtime, entry.name, Path(entry.path)))
                except OSError:
                    continue
    except OSError:
        return []
    return [path for _, _, path in sorted(found, reverse=True)]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
