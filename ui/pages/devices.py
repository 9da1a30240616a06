"""The device page: attached phones/boards (adb) and saved SSH targets, add a target, profile a model
and precision on one (off the GUI thread, with progress and cancel), and show latency per step, per
component and per operator, first run against warm runs, peak memory; compare two runs side by side.

Everything goes through ``snapgen_app.service`` (list_remote_devices, add_device_target,
profile_request, profile_on_device, compare_profiles, load_device_profile)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from model_store.registry import Registry
from snapgen_app import service
from snapgen_app.errors import SnapGenError
from snapgen_app.progress import CancelToken, Event
from ui.controller import Controller, TaskMessage

Notify = Callable[[str, str], None]
DEVICE_COLUMNS = ("Target", "Kind", "State", "Details")
COMPONENT_COLUMNS = (
    "Component",
    "Session (ms)",
    "First run (ms)",
    "Warm p50 (ms)",
    "Warm mean (ms)",
    "Min–max (ms)",
    "Peak memory (MiB)",
)
OP_COLUMNS = ("Component", "Operator", "Total (ms)", "Calls", "Share")
COMPARE_COLUMNS = ("Component", "A p50 (ms)", "B p50 (ms)", "B / A")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.2f}"


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.2f} ms"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def _fill(table: QTableWidget, rows: list[tuple[str, ...]]) -> None:
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            item = QTableWidgetItem(value)
            if c > 0:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(r, c, item)


def _table(columns: tuple[str, ...]) -> QTableWidget:
    table = QTableWidget(0, len(columns))
    table.setHorizontalHeaderLabels(columns)
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    table.horizontalHeader().setStretchLastSection(True)
    return table


def run_label(result: Any) -> str:
    """One line naming a profile run: model, precision, provider, target, time."""
    return (
        f"{result.model_name} {result.precision} {result.provider} on {result.target} ({result.created[:19]})"
    )


class DevicesPage(QWidget):
    """Lists devices, profiles on one of them and shows/compares the results."""

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
        self.devices: list[Any] = []
        self.results: list[Any] = []  # ProfileResult, oldest first
        self.connect_options: dict[str, Any] = {}  # extra ConnectOptions for profiles (tests: none)
        self._profile_task: int | None = None
        self._list_task: int | None = None
        self._build()
        controller.message.connect(self._on_message)

    # -- layout -----------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.device_table = _table(DEVICE_COLUMNS)
        self.device_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.device_table.itemSelectionChanged.connect(self._on_device_selected)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(lambda: self.refresh())
        self.target_edit = QLineEdit()
        self.target_edit.setPlaceholderText("ssh:USER@HOST[:PORT] or adb:SERIAL")
        self.key_edit = QLineEdit()
        self.key_edit.setPlaceholderText("SSH key file (optional)")
        self.python_edit = QLineEdit()
        self.python_edit.setPlaceholderText("python3 (the device's Python with numpy + onnxruntime)")
        self.remote_dir_edit = QLineEdit()
        self.remote_dir_edit.setPlaceholderText("work folder on the device (optional)")
        key_browse = QPushButton("…")
        key_browse.clicked.connect(self._browse_key)
        self.add_button = QPushButton("Add target")
        self.add_button.clicked.connect(self.add_target)
        add_box = QGroupBox("Add an SSH board or adb phone")
        add_form = QFormLayout(add_box)
        add_form.addRow("Target", self.target_edit)
        key_row = QHBoxLayout()
        key_row.addWidget(self.key_edit, 1)
        key_row.addWidget(key_browse)
        add_form.addRow("Key", key_row)
        add_form.addRow("Python", self.python_edit)
        add_form.addRow("Folder", self.remote_dir_edit)
        add_form.addRow(self.add_button)
        devices_box = QGroupBox("Devices")
        devices_layout = QVBoxLayout(devices_box)
        top_row = QHBoxLayout()
        top_row.addWidget(QLabel("Attached phones/boards and saved SSH targets"), 1)
        top_row.addWidget(self.refresh_button)
        devices_layout.addLayout(top_row)
        devices_layout.addWidget(self.device_table, 1)

        self.model_combo = QComboBox()
        self.precision_combo = QComboBox()
        for value in ("auto", "int8", "fp16", "fp32"):
            self.precision_combo.addItem(value, value)
        self.ep_combo = QComboBox()
        for value in ("cpu", "nnapi", "xnnpack", "qnn", "coreml"):
            self.ep_combo.addItem(value, value)
        self.runs_spin = QSpinBox()
        self.runs_spin.setRange(1, 1000)
        self.runs_spin.setValue(10)
        self.threads_spin = QSpinBox()
        self.threads_spin.setRange(0, 64)
        self.threads_spin.setSpecialValueText("default")
        self.profile_button = QPushButton("Profile")
        self.profile_button.clicked.connect(self.profile_clicked)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_profile)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("Choose a device, a model and a precision, then Profile.")
        self.status.setWordWrap(True)
        self.status.setMinimumHeight(3 * self.status.fontMetrics().height())  # wrapped lines stay visible
        profile_box = QGroupBox("Profile")
        form = QFormLayout(profile_box)
        form.addRow("Model", self.model_combo)
        form.addRow("Precision", self.precision_combo)
        form.addRow("Execution provider", self.ep_combo)
        form.addRow("Timed runs", self.runs_spin)
        form.addRow("Threads", self.threads_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.profile_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)
        form.addRow(buttons)
        form.addRow(self.status)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(devices_box, 1)
        left_layout.addWidget(add_box)
        left_layout.addWidget(profile_box)

        self.summary = QLabel("No profile yet.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.component_table = _table(COMPONENT_COLUMNS)
        self.op_table = _table(OP_COLUMNS)
        self.runs_list = QListWidget()
        self.runs_list.currentRowChanged.connect(self._show_run)
        self.open_button = QPushButton("Open saved profile…")
        self.open_button.clicked.connect(self._open_saved)
        self.compare_a = QComboBox()
        self.compare_b = QComboBox()
        self.compare_button = QPushButton("Compare")
        self.compare_button.clicked.connect(self.compare_selected)
        self.compare_table = _table(COMPARE_COLUMNS)
        self.compare_note = QLabel("")
        self.compare_note.setWordWrap(True)

        result_tab = QWidget()
        result_layout = QVBoxLayout(result_tab)
        result_layout.addWidget(self.summary)
        result_layout.addWidget(QLabel("Per component (a UNet call is one denoising step):"))
        result_layout.addWidget(self.component_table, 2)
        result_layout.addWidget(QLabel("Per operator (ONNX Runtime node profile):"))
        result_layout.addWidget(self.op_table, 2)
        runs_tab = QWidget()
        runs_layout = QVBoxLayout(runs_tab)
        runs_layout.addWidget(self.runs_list, 1)
        runs_layout.addWidget(self.open_button)
        compare_tab = QWidget()
        compare_layout = QVBoxLayout(compare_tab)
        pick = QFormLayout()
        pick.addRow("A", self.compare_a)
        pick.addRow("B", self.compare_b)
        compare_layout.addLayout(pick)
        compare_layout.addWidget(self.compare_button)
        compare_layout.addWidget(self.compare_table, 1)
        compare_layout.addWidget(self.compare_note)
        self.tabs = QTabWidget()
        self.tabs.addTab(result_tab, "Result")
        self.tabs.addTab(runs_tab, "Runs")
        self.tabs.addTab(compare_tab, "Compare")

        for combo in (self.model_combo, self.compare_a, self.compare_b):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(14)
        scroll = QScrollArea()  # the forms scroll rather than force a wide window
        scroll.setWidget(left)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(280)
        splitter = QSplitter()
        splitter.addWidget(scroll)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([400, 700])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

    @property
    def registry(self) -> Registry:
        return self._registry()

    @property
    def listing(self) -> bool:
        """True while the device list is being read."""
        return self._list_task is not None

    # -- devices -----------------------------------------------------------------------------------------

    def set_models(self, models: list[Any]) -> None:
        """Models with a runtime bundle, for the profile picker (the window calls this on refresh)."""
        current = self.model_combo.currentData()
        self.model_combo.clear()
        for model in models:
            if model.has_bundle:
                self.model_combo.addItem(f"{model.name}  [{', '.join(model.variants)}]", model.name)
        if self.model_combo.count() == 0:
            self.model_combo.addItem("no model installed (see Models)", "")
        index = self.model_combo.findData(current) if current else -1
        if index >= 0:
            self.model_combo.setCurrentIndex(index)

    def refresh(self) -> int:
        """List devices on a worker (adb can take a moment); the table fills when it answers."""

        def body(report: Callable[[Event], None], token: CancelToken) -> list[Any]:
            return service.list_remote_devices()

        self.refresh_button.setEnabled(False)
        self._list_task = self.controller.run_task("devices", body)
        return self._list_task

    def _fill_devices(self, devices: list[Any]) -> None:
        selected = self.selected_target()
        self.devices = devices
        rows = []
        for device in devices:
            details = "  ".join(p for p in (device.model, device.soc, device.os, device.abi) if p)
            rows.append((device.target, device.kind, device.state, details))
        _fill(self.device_table, rows)
        if selected:
            self.select_target(selected)
        elif devices:
            self.device_table.selectRow(0)

    def selected_target(self) -> str:
        row = self.device_table.currentRow()
        item = self.device_table.item(row, 0) if row >= 0 else None
        return item.text() if item is not None else ""

    def select_target(self, target: str) -> bool:
        for row in range(self.device_table.rowCount()):
            item = self.device_table.item(row, 0)
            if item is not None and item.text() == target:
                self.device_table.selectRow(row)
                return True
        return False

    def _on_device_selected(self) -> None:
        target = self.selected_target()
        if target:
            self.status.setText(f"Device {target}: choose a model and precision, then Profile.")

    def _browse_key(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SSH private key")
        if path:
            self.key_edit.setText(path)

    def add_target(self) -> str | None:
        """Save the target of the form (SSH key, device Python, work folder); refreshes the list."""
        options: dict[str, Any] = {}
        if self.key_edit.text().strip():
            options["ssh_key"] = self.key_edit.text().strip()
        if self.python_edit.text().strip():
            options["remote_python"] = self.python_edit.text().strip()
        if self.remote_dir_edit.text().strip():
            options["remote_dir"] = self.remote_dir_edit.text().strip()
        try:
            target = service.add_device_target(self.target_edit.text().strip(), **options)
        except SnapGenError as exc:
            self.notify(f"Cannot add the target: {exc}", "error")
            return None
        self.notify(f"saved target {target}", "info")
        self.target_edit.clear()
        self.refresh()
        return target

    # -- profile -----------------------------------------------------------------------------------------

    def profile_clicked(self) -> int | None:
        target = self.selected_target() or self.target_edit.text().strip()
        if not target:
            self.notify("choose a device in the list (or add one) to profile on", "error")
            return None
        return self.profile(target)

    def profile(self, target: str) -> int | None:
        """Profile the chosen model/precision on ``target`` on a worker; returns the task id."""
        if self._profile_task is not None:
            self.notify("a profile is already running; cancel it or wait", "info")
            return None
        model = self.model_combo.currentData() or ""
        if not model:
            self.notify("no model to profile: install one on the Models page", "error")
            return None
        try:
            request = service.profile_request(
                model=model,
                target=target,
                precision=self.precision_combo.currentData(),
                ep=self.ep_combo.currentData(),
                runs=self.runs_spin.value(),
                threads=self.threads_spin.value(),
                **self.connect_options,
            )
        except SnapGenError as exc:
            self.notify(f"Cannot profile: {exc}", "error")
            return None

        def body(report: Callable[[Event], None], token: CancelToken) -> Any:
            return service.profile_on_device(request, on_event=report, cancel=token)

        self.progress.setRange(0, 0)  # busy until the service says how many components
        self.status.setText(f"Profiling {model} on {target}…")
        self.profile_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._profile_task = self.controller.run_task("profile", body, cancel_on_report=False)
        return self._profile_task

    def cancel_profile(self) -> None:
        if self._profile_task is not None:
            self.controller.cancel(self._profile_task)
            self.status.setText("Cancelling (stops after the current command on the device)…")

    # -- messages ------------------------------------------------------------------------------------------

    @Slot(object)
    def _on_message(self, message: TaskMessage) -> None:
        if message.task_id == self._list_task and message.is_terminal:
            self._list_task = None
            self.refresh_button.setEnabled(True)
            if message.kind == "finished":
                self._fill_devices(message.result)
            elif message.kind == "error":
                self.notify(f"Cannot list devices: {message.error}", "error")
            return
        if message.task_id != self._profile_task:
            return
        if message.kind == "event" and message.event is not None:
            event = message.event
            if event.total:
                self.progress.setRange(0, event.total)
                self.progress.setValue(event.step)
            if event.message:
                self.status.setText(event.message)
            return
        if not message.is_terminal:
            return
        self._profile_task = None
        self.profile_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if message.kind == "finished" else 0)
        if message.kind == "error":
            self.status.setText(f"Profile failed: {message.error}")
            self.notify(f"Profile failed: {message.error}", "error")
        elif message.kind == "cancelled":
            self.status.setText("Profile cancelled.")
            self.notify("profile cancelled", "info")
        else:
            self.add_result(message.result)
            partial = " (PARTIAL: " + "; ".join(message.result.errors) + ")" if message.result.partial else ""
            self.status.setText(f"Profile done{partial}.")
            self.notify(f"profiled {run_label(message.result)}{partial}", "warning" if partial else "info")

    # -- results ---------------------------------------------------------------------------------------------

    def add_result(self, result: Any) -> None:
        """Keep ``result`` in the runs list, show it, and offer it for comparison."""
        self.results.append(result)
        label = run_label(result)
        self.runs_list.addItem(label)
        for combo in (self.compare_a, self.compare_b):
            combo.addItem(label, len(self.results) - 1)
        if len(self.results) >= 2:
            self.compare_a.setCurrentIndex(len(self.results) - 2)
            self.compare_b.setCurrentIndex(len(self.results) - 1)
        self.runs_list.setCurrentRow(len(self.results) - 1)
        self.show_result(result)

    def _show_run(self, row: int) -> None:
        if 0 <= row < len(self.results):
            self.show_result(self.results[row])

    def show_result(self, result: Any) -> None:
        """Fill the summary, per-component and per-operator tables."""
        estimate = result.estimated_seconds()
        steps = result.steps
        if estimate:
            per_step = (
                f"one step (UNet) {_ms(estimate['unet'])} ms; {steps} steps: text {_ms(estimate['text_encoder'])} ms"
                f" + UNet {_ms(estimate['unet_total'])} ms + decoder {_ms(estimate['decoder'])} ms"
                f" = <b>{_seconds(estimate['total'])} per image</b>"
            )
        else:
            per_step = "some component has no measurement"
        self.summary.setText(
            f"<b>{result.device.summary()}</b><br>{result.model_name} {result.precision} on {result.provider}, "
            f"{result.width}×{result.height}, {result.runs} timed runs<br>{per_step}"
            + ("<br><b>Partial:</b> " + "; ".join(result.errors) if result.partial else "")
        )
        rows = []
        for c in result.components:
            latency = c.latency
            span = f"{_ms(latency.min_s)}–{_ms(latency.max_s)}" if latency else "—"
            rows.append(
                (
                    f"{c.name} ({c.role})",
                    _ms(c.session_create_s),
                    _ms(c.first_run_s),
                    _ms(c.warm_s),
                    _ms(latency.mean_s if latency else None),
                    span,
                    _mib(c.peak_rss_bytes),
                )
            )
        _fill(self.component_table, rows)
        ops = [
            (c.name, op.op_type, f"{op.total_ms:.2f}", str(op.count), f"{op.share:.0%}")
            for c in result.components
            for op in c.top_ops
        ]
        _fill(self.op_table, ops)

    def compare_selected(self) -> list[Any]:
        """Compare the runs chosen as A and B; rows land in the compare table."""
        a, b = self.compare_a.currentData(), self.compare_b.currentData()
        if a is None or b is None:
            self.notify("profile at least one run (two to compare different settings)", "info")
            return []
        return self.compare(self.results[a], self.results[b])

    def compare(self, a: Any, b: Any) -> list[Any]:
        rows = service.compare_profiles(a, b)
        _fill(
            self.compare_table,
            [
                (row.name, _ms(row.a_s), _ms(row.b_s), "—" if row.ratio is None else f"{row.ratio:.2f}×")
                for row in rows
            ],
        )
        note = f"A: {run_label(a)}\nB: {run_label(b)}"
        if a.bundle_hash != b.bundle_hash:
            note += "\nThe two runs used different bundles."
        self.compare_note.setText(note)
        self.tabs.setCurrentIndex(2)
        return rows

    def _open_saved(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Saved profile", "", "Profiles (*.json)")
        if path:
            self.open_profile(path)

    def open_profile(self, path: str) -> bool:
        try:
            self.add_result(service.load_device_profile(path))
        except SnapGenError as exc:
            self.notify(f"Cannot open the profile: {exc}", "error")
            return False
        return True
