"""The main window: a page list on the left (Generate, Gallery, Models, Personal style, Devices,
Settings), a non-modal message banner on top, drag-and-drop of our PNGs to reuse their settings,
shortcuts, and its geometry/state/page remembered in QSettings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QSettings, QSize, Slot
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QListWidget,
    QMainWindow,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from model_store.registry import Registry
from snapgen_app.errors import SnapGenError
from ui.about import AboutDialog
from ui.app_settings import AppSettings, default_settings
from ui.controller import Controller
from ui.extras import read_png_request
from ui.pages.devices import DevicesPage
from ui.pages.gallery import GalleryPage
from ui.pages.generate import GeneratePage
from ui.pages.models import ModelsPage
from ui.pages.settings import SettingsPage
from ui.pages.wizard import WizardPage
from ui.widgets.banner import MessageBanner

PAGES = ("Generate", "Gallery", "Models", "Personal style", "Devices", "Settings")
GENERATE, GALLERY, MODELS, WIZARD, DEVICES, SETTINGS = range(len(PAGES))


class MainWindow(QMainWindow):
    """SnapGen Studio's window. ``settings`` (a QSettings) and ``registry`` (a callable returning the
    model_store Registry to show) are injectable so tests run on temporary folders."""

    def __init__(
        self,
        settings: QSettings | None = None,
        registry: Callable[[], Registry] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("SnapGen Studio")
        self.setObjectName("mainWindow")
        self.settings = AppSettings(settings if settings is not None else default_settings())
        self._registry = registry if registry is not None else Registry
        self.controller = Controller(self)
        self.banner = MessageBanner()
        self._about: AboutDialog | None = None

        self.generate_page = GeneratePage(self.controller, self.settings, self.notify)
        self.gallery_page = GalleryPage(self.settings.output_dir, self.notify)
        self.models_page = ModelsPage(self.controller, self._registry, self.notify)
        self.wizard_page = WizardPage(self.controller, self._registry, self.settings, self.notify)
        self.devices_page = DevicesPage(self.controller, self._registry, self.notify)
        self.settings_page = SettingsPage(self.settings, self.notify)

        self.nav = QListWidget()
        self.nav.addItems(list(PAGES))
        self.nav.setFixedWidth(120)
        self.stack = QStackedWidget()
        for page in (
            self.generate_page,
            self.gallery_page,
            self.models_page,
            self.wizard_page,
            self.devices_page,
            self.settings_page,
        ):
            self.stack.addWidget(page)
        self.nav.currentRowChanged.connect(self.stack.setCurrentIndex)
        self.stack.currentChanged.connect(self._on_page_shown)

        body = QWidget()
        row = QVBoxLayout(body)
        row.addWidget(self.banner)
        row.addWidget(self.stack, 1)
        central = QWidget()
        outer = QHBoxLayout(central)
        outer.addWidget(self.nav)
        outer.addWidget(body, 1)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Ready")
        self.setAcceptDrops(True)

        self.generate_page.imagesGenerated.connect(self.gallery_page.add_images)
        self.gallery_page.reuseRequested.connect(self.reuse_settings)
        self.models_page.modelsChanged.connect(self.refresh_models)
        self.wizard_page.modelsChanged.connect(self.refresh_models)
        self.settings_page.saved.connect(self._on_settings_saved)
        self._build_menus()
        self.refresh_models()
        self._restore_window()

    # -- menus and shortcuts -------------------------------------------------------------------------

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self._action(file_menu, "Generate", "Ctrl+Return", self.generate_page.submit)
        self._action(file_menu, "Cancel generation", "Esc", self.generate_page.cancel)
        self._action(file_menu, "Reuse settings from a PNG…", "Ctrl+O", self._reuse_from_file)
        file_menu.addSeparator()
        self._action(file_menu, "Quit", QKeySequence.StandardKey.Quit, self.close)
        view_menu = self.menuBar().addMenu("&View")
        for index, name in enumerate(PAGES):
            self._action(view_menu, name, f"Ctrl+{index + 1}", lambda i=index: self.show_page(i))
        self._action(
            view_menu, "Settings", QKeySequence.StandardKey.Preferences, lambda: self.show_page(SETTINGS)
        )
        help_menu = self.menuBar().addMenu("&Help")
        self._action(help_menu, "About SnapGen Studio", "F1", self.show_about)
        # Ctrl+Enter on the numeric keypad too
        QShortcut(QKeySequence("Ctrl+Enter"), self, activated=self.generate_page.submit)

    def _action(
        self, menu: object, text: str, shortcut: str | QKeySequence.StandardKey, slot: Callable[[], object]
    ) -> QAction:
        action = QAction(text, self)
        action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(lambda _checked=False: slot())
        menu.addAction(action)  # type: ignore[attr-defined]
        return action

    def show_page(self, index: int) -> None:
        self.nav.setCurrentRow(index)

    def current_page(self) -> int:
        return self.stack.currentIndex()

    def show_about(self) -> AboutDialog:
        if self._about is None:
            self._about = AboutDialog(self)
        self._about.show()
        self._about.raise_()
        return self._about

    # -- messages ------------------------------------------------------------------------------------

    def notify(self, text: str, level: str = "info") -> None:
        """Show a message in the banner and the status bar; never blocks (``level``: info, warning,
        error)."""
        self.statusBar().showMessage(text, 10000)
        self.banner.show_message(text, level)  # type: ignore[arg-type]

    # -- models and settings ---------------------------------------------------------------------------

    @Slot()
    def refresh_models(self) -> None:
        models = self.models_page.refresh()
        self.generate_page.set_models(models)
        self.devices_page.set_models(models)

    def _on_page_shown(self, index: int) -> None:
        # the device list asks adb (slow): only when the page is first shown
        if index == DEVICES and not self.devices_page.devices and not self.devices_page.listing:
            self.devices_page.refresh()
        if index == WIZARD:
            self.wizard_page.on_shown()  # a run started elsewhere (or before a restart) shows up

    def _on_settings_saved(self) -> None:
        self.refresh_models()
        self.gallery_page.refresh()

    # -- reuse settings ------------------------------------------------------------------------------

    @Slot(str)
    def reuse_settings(self, path: str) -> bool:
        """Restore every generate field from the PNG's metadata; a PNG without it gives a message."""
        try:
            request = read_png_request(path)
        except SnapGenError as exc:
            self.notify(f"Cannot reuse settings: {exc}", "error")
            return False
        warnings = self.generate_page.apply_request(request)
        self.show_page(GENERATE)
        if warnings:
            self.notify(f"Settings of {Path(path).name} restored, but: " + "; ".join(warnings), "warning")
        else:
            self.notify(f"Settings of {Path(path).name} restored (seed {request.seed})", "info")
        return True

    def _reuse_from_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Reuse settings from", str(self.settings.output_dir()), "PNG (*.png)"
        )
        if path:
            self.reuse_settings(path)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if _png_paths(event.mimeData().urls() if event.mimeData().hasUrls() else []):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = _png_paths(event.mimeData().urls())
        if paths:
            event.acceptProposedAction()
            self.reuse_settings(paths[0])

    # -- window state ----------------------------------------------------------------------------------

    def _restore_window(self) -> None:
        geometry = self.settings.window_geometry()
        if geometry is None or not self.restoreGeometry(geometry):
            self.resize(QSize(1180, 760))
        state = self.settings.window_state()
        if state is not None:
            self.restoreState(state)
        self.show_page(max(0, min(len(PAGES) - 1, self.settings.last_page())))

    def closeEvent(self, event: QCloseEvent) -> None:
        self.settings.save_window(self.saveGeometry(), self.saveState(), self.current_page())
        self.wizard_page.shutdown()  # stops watching; the training subprocess keeps running
        self.controller.shutdown()
        super().closeEvent(event)


def _png_paths(urls: list) -> list[str]:
    return [u.toLocalFile() for u in urls if u.isLocalFile() and u.toLocalFile().lower().endswith(".png")]
