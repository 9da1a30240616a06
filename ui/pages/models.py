"""The models page: installed models (size, source, variants, verification), download from the
catalog or a repo id with progress and stop/resume, import a folder or zip, verify, remove."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from model_store import catalog
from model_store.download import DownloadProgress, download_model
from model_store.errors import StoreError
from model_store.imports import import_model
from model_store.registry import RegisteredModel, Registry
from snapgen_app.progress import CancelToken, Event
from ui.controller import Controller, TaskMessage
from ui.pages.gallery import Confirm, ask

Notify = Callable[[str, str], None]
COLUMNS = ("Name", "Kind", "Variants", "Size", "Source", "License", "Verification")
STORE_TASKS = ("download", "verify", "import", "remove")


def human_size(size: int) -> str:
    """Bytes as a short text (``1.5 MB``)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def describe_source(model: RegisteredModel) -> str:
    source = model.source
    if source.type == "hub":
        return f"hub {source.repo}@{(source.revision or '')[:10]}"
    if source.type == "import" and source.request:
        return f"import {Path(str(source.request)).name}"
    return source.type


class ModelsPage(QWidget):
    """Talks to ``model_store`` through the controller's worker pool; ``modelsChanged`` after any
    install/remove so the model picker refreshes."""

    modelsChanged = Signal()

    def __init__(
        self,
        controller: Controller,
        registry: Callable[[], Registry],
        notify: Notify,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.controller = controller
        self._registry = registry
        self.notify = notify
        self.confirm: Confirm = lambda title, question: ask(self, title, question)
        self.choose_folder: Callable[[], str] = lambda: QFileDialog.getExistingDirectory(
            self, "Import a model folder"
        )
        self.choose_zip: Callable[[], str] = lambda: QFileDialog.getOpenFileName(
            self, "Import a model archive", "", "Zip archives (*.zip)"
        )[0]
        self.models: list[RegisteredModel] = []
        self.verification: dict[str, str] = {}
        self._tasks: dict[int, tuple[str, str]] = {}  # task id -> (task, model name or spec)
        self._download_task: int | None = None
        self._build()
        controller.message.connect(self._on_message)

    # -- layout --------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)

        actions = QHBoxLayout()
        self.refresh_button = _button("Refresh", self.refresh, actions)
        self.verify_button = _button("Verify", self.verify_selected, actions)
        self.remove_button = _button("Remove…", self.remove_selected, actions)
        self.import_folder_button = _button("Import folder…", self._import_folder_clicked, actions)
        self.import_zip_button = _button("Import zip…", self._import_zip_clicked, actions)
        actions.addStretch(1)

        self.catalog_combo = QComboBox()
        self.repo_edit = QLineEdit()
        self.repo_edit.setPlaceholderText("or a Hub repo: ORG/NAME[@REVISION]")
        self.precision_combo = QComboBox()
        for label, value in (("all variants", ""), ("int8", "int8"), ("fp16", "fp16"), ("fp32", "fp32")):
            self.precision_combo.addItem(label, value)
        self.download_button = QPushButton("Download")
        self.download_button.clicked.connect(self.download_clicked)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the download; the partial files are kept and Download resumes them")
        self.stop_button.clicked.connect(self.stop_download)
        self.stop_button.setEnabled(False)
        self.download_bar = QProgressBar()
        self.download_bar.setRange(0, 1000)
        self.download_bar.setValue(0)
        self.download_bar.setFormat("%p%")
        self.task_label = QLabel("Downloads need the network; everything else works offline.")
        self.task_label.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.catalog_combo, 2)
        row.addWidget(self.repo_edit, 2)
        row.addWidget(self.precision_combo)
        row.addWidget(self.download_button)
        row.addWidget(self.stop_button)
        download_box = QGroupBox("Download")
        box_layout = QVBoxLayout(download_box)
        box_layout.addLayout(row)
        box_layout.addWidget(self.download_bar)
        box_layout.addWidget(self.task_label)

        layout = QVBoxLayout(self)
        layout.addLayout(actions)
        layout.addWidget(self.table, 1)
        layout.addWidget(download_box)

    @property
    def registry(self) -> Registry:
        return self._registry()

    # -- contents ------------------------------------------------------------------------------------

    @Slot()
    def refresh(self) -> list[RegisteredModel]:
        """Re-read the registry (no network, no hashing) and the catalog."""
        try:
            self.models = self.registry.list()
        except StoreError as exc:
            self.models = []
            self.notify(f"cannot read the model registry: {exc}", "error")
        self._fill_table()
        self._fill_catalog()
        return self.models

    def _fill_table(self) -> None:
        self.table.setRowCount(len(self.models))
        for row, model in enumerate(self.models):
            values = (
                model.name,
                model.kind,
                ", ".join(model.variants) or "—",
                human_size(model.size_bytes),
                describe_source(model),
                model.license or "—",
                self.verification.get(model.name, "not checked"),
            )
            for column, value in enumerate(values):
                item = QTableWidgetItem(value)
                item.setData(Qt.ItemDataRole.UserRole, model.name)
                self.table.setItem(row, column, item)

    def _fill_catalog(self) -> None:
        self.catalog_combo.clear()
        try:
            entries = [e for e in catalog.load_catalog() if e.download_spec]
        except StoreError as exc:
            entries = []
            self.task_label.setText(f"The catalog is unreadable: {exc}")
        for entry in entries:
            self.catalog_combo.addItem(f"{entry.name} — {entry.description[:60]}", entry.download_spec)
        if not entries:
            self.catalog_combo.addItem("catalog: no downloadable models yet", "")

    def selected_name(self) -> str | None:
        row = self.table.currentRow()
        item = self.table.item(row, 0) if row >= 0 else None
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None

    def select_name(self, name: str) -> bool:
        for row, model in enumerate(self.models):
            if model.name == name:
                self.table.selectRow(row)
                return True
        return False

    # -- actions -------------------------------------------------------------------------------------

    def verify_selected(self) -> int | None:
        """Re-hash the selected model's files on a worker; the result lands in the table."""
        name = self.selected_name()
        if name is None:
            self.notify("select a model to verify", "info")
            return None
        registry = self.registry

        def body(report: Callable[[Event], None], token: CancelToken) -> list:
            def progress(done: int, total: int, file: str) -> None:
                report(Event(kind="progress", stage="verify", step=done, total=total, data={"file": file}))

            return registry.verify(name, progress=progress, cancel=lambda: token.cancelled)

        self.verification[name] = "checking…"
        self._fill_table()
        return self._run("verify", name, body)

    def remove_selected(self) -> int | None:
        name = self.selected_name()
        if name is None:
            self.notify("select a model to remove", "info")
            return None
        if not self.confirm("Remove model", f"Delete the model {name!r} and its files from this computer?"):
            return None
        registry = self.registry
        return self._run("remove", name, lambda report, token: registry.remove(name))

    def _import_folder_clicked(self) -> None:
        path = self.choose_folder()
        if path:
            self.import_path(path)

    def _import_zip_clicked(self) -> None:
        path = self.choose_zip()
        if path:
            self.import_path(path)

    def import_path(self, path: str | Path) -> int:
        """Import a model folder or zip (validated and hashed) on a worker."""
        registry = self.registry

        def body(report: Callable[[Event], None], token: CancelToken) -> RegisteredModel:
            report(Event(kind="started", stage="import", message=f"importing {Path(path).name}"))
            return import_model(path, registry=registry, cancel=lambda: token.cancelled)

        return self._run("import", str(path), body)

    def download_clicked(self) -> int | None:
        spec = self.repo_edit.text().strip() or (self.catalog_combo.currentData() or "")
        if not spec:
            self.notify("choose a catalog model or type a Hub repo id (ORG/NAME[@REVISION])", "error")
            return None
        return self.download(spec, self.precision_combo.currentData() or None)

    def download(self, spec: str, precision: str | None = None) -> int | None:
        """Download ``ORG/NAME[@REVISION]`` with progress; Stop keeps partial files for a resume."""
        if self._download_task is not None:
            self.notify("a download is already running; stop it or wait for it", "info")
            return None
        registry = self.registry

        def body(report: Callable[[Event], None], token: CancelToken) -> RegisteredModel:
            def progress(p: DownloadProgress) -> None:
                report(
                    Event(
                        kind="progress",
                        stage="download",
                        step=p.bytes_done,
                        total=p.bytes_total,
                        eta_s=p.eta_s,
                        data={
                            "file": p.current_file,
                            "files": f"{p.files_done}/{p.files_total}",
                            "speed": p.bytes_per_s,
                        },
                    )
                )

            return download_model(
                spec,
                precision=precision,
                registry=registry,
                progress=progress,
                cancel=lambda: token.cancelled,
            )

        self.download_bar.setValue(0)
        self._download_task = self._run("download", spec, body, cancel_on_report=False)
        self.stop_button.setEnabled(True)
        self.download_button.setEnabled(False)
        return self._download_task

    def stop_download(self) -> None:
        if self._download_task is not None:
            self.controller.cancel(self._download_task)
            self.task_label.setText("Stopping… (partial files are kept)")

    def _run(self, task: str, subject: str, body: Callable, cancel_on_report: bool = True) -> int:
        task_id = self.controller.run_task(task, body, cancel_on_report=cancel_on_report)
        self._tasks[task_id] = (task, subject)
        self.task_label.setText(f"{task} {subject}…")
        return task_id

    # -- messages ------------------------------------------------------------------------------------

    @Slot(object)
    def _on_message(self, message: TaskMessage) -> None:
        if message.task_id not in self._tasks:
            return
        task, subject = self._tasks[message.task_id]
        if message.kind == "event" and message.event is not None:
            self._on_progress(task, subject, message.event)
            return
        if not message.is_terminal:
            return
        del self._tasks[message.task_id]
        if task == "download":
            self._download_task = None
            self.stop_button.setEnabled(False)
            self.download_button.setEnabled(True)
        if message.kind == "error":
            self._on_error(task, subject, message.error)
        elif message.kind == "cancelled":
            if task == "verify":
                self.verification.pop(subject, None)
            note = " (partial files kept: Download again to resume)" if task == "download" else ""
            self.task_label.setText(f"{task} {subject} stopped{note}")
            self.notify(f"{task} of {subject} stopped{note}", "info")
        elif task == "verify":
            self._on_verified(subject, message.result)
        else:
            self._on_changed(task, subject, message.result)
        self._fill_table()

    def _on_progress(self, task: str, subject: str, event: Event) -> None:
        if event.total > 0:
            fraction = event.step / event.total
            if task == "download":
                self.download_bar.setValue(int(1000 * fraction))
            detail = event.data.get("file", "")
            eta = f", {event.eta_s:.0f} s left" if event.eta_s else ""
            self.task_label.setText(
                f"{task} {subject}: {human_size(event.step)} of {human_size(event.total)} ({fraction:.0%}) {detail}{eta}"
            )
        elif event.message:
            self.task_label.setText(event.message)

    def _on_error(self, task: str, subject: str, error: str) -> None:
        if task == "verify":
            self.verification[subject] = "error"
        self.task_label.setText(f"{task} {subject} failed")
        self.notify(f"{task.capitalize()} of {subject} failed: {error}", "error")

    def _on_verified(self, name: str, checks: list) -> None:
        bad = [c for c in checks if c.status in ("missing", "mismatch")]
        if bad:
            self.verification[name] = f"FAILED ({len(bad)} file(s))"
            shown = "; ".join(c.describe() for c in bad[:3])
            self.notify(
                f"model {name!r} failed verification: {shown}. Re-download or re-import it, or remove it.",
                "error",
            )
        else:
            self.verification[name] = f"ok ({len(checks)} files)"
            self.notify(f"model {name!r}: all {len(checks)} files match their sha256", "info")
        self.task_label.setText(f"verified {name}: {self.verification[name]}")

    def _on_changed(self, task: str, subject: str, result: object) -> None:
        name = getattr(result, "name", subject)
        self.verification.pop(name, None)
        verb = {"download": "downloaded", "import": "imported", "remove": "removed"}[task]
        self.task_label.setText(f"{verb} {name}")
        self.notify(f"{verb} model {name!r}", "info")
        self.refresh()
        self.modelsChanged.emit()


def _button(text: str, slot: Callable[[], object], row: QHBoxLayout) -> QPushButton:
    button = QPushButton(text)
    button.clicked.connect(lambda: slot())
    row.addWidget(button)
    return button
