"""The distillation wizard ("Personal style"): fine-tune a model on a folder of your own images.

Steps (a QWizard embedded in the page): images folder -> captions -> base model and teacher ->
settings with the estimate for this machine -> training (live loss curves, samples at fixed seeds,
pause/resume/cancel) -> side-by-side comparison with the base model -> export, quantize, register.

Training runs as a detached subprocess (``service.finetune.start``); the page only reads the run's
``events.jsonl`` on a timer, so closing the window leaves the run going, and opening the page again
reattaches to it (:meth:`WizardPage.reattach`). Slow work (estimate, export, comparison images,
registration) runs on the controller's pool through ``run_task``, never on the GUI thread.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QImage
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
    QWizard,
    QWizardPage,
)

from model_store.registry import RegisteredModel, Registry
from snapgen_app import service
from snapgen_app.api import GenerationRequest
from snapgen_app.errors import SnapGenError
from snapgen_app.progress import CancelToken, Event
from ui.app_settings import AppSettings
from ui.controller import Controller, TaskMessage
from ui.widgets.image_view import scaled_pixmap
from ui.widgets.loss_plot import LossPlot

ft = service.finetune
Notify = Callable[[str, str], None]
FOLDER, CAPTIONS, MODEL, SETTINGS, TRAIN, COMPARE, REGISTER = range(7)
THUMB = 96
POLL_MS = 300


def _cell(table: QTableWidget, row: int, column: int) -> str:
    item = table.item(row, column)
    return item.text() if item is not None else ""


def _image_label(path: str | Path, size: int = THUMB) -> QLabel:
    label = QLabel()
    label.setAlignment(Qt.AlignmentFlag.AlignCenter)
    image = QImage(str(path))
    if image.isNull():
        label.setText(Path(path).name)
    else:
        label.setPixmap(scaled_pixmap(image, size))
    label.setToolTip(str(path))
    return label


class WizardState:
    """What the steps share: the folder report, edited captions, chosen base, request and run."""

    def __init__(self) -> None:
        self.report: Any = None  # finetune.FolderReport
        self.captions: dict[str, str] = {}
        self.captions_edited = False
        self.base: Any = None  # finetune.BaseModel
        self.base_choice = ""  # a registered model name or a checkpoint folder
        self.teacher = ""
        self.request: Any = None  # finetune.FineTuneRequest
        self.estimate: Any = None  # finetune.Estimate
        self.estimate_for: Any = None
        self.handle: Any = None  # finetune.RunHandle
        self.comparison: list[tuple[str, int, str, str]] = []  # prompt, seed, base png, tuned png
        self.registered: RegisteredModel | None = None


# -- steps ---------------------------------------------------------------------------------------------


class FolderStep(QWizardPage):
    """1. Choose the images folder; Next checks it (no images -> a message, stays here)."""

    def __init__(self, owner: WizardPage) -> None:
        super().__init__()
        self.owner = owner
        self.setTitle("1. Your images")
        self.setSubTitle("Choose a folder of pictures in the style you want (10-100 images work well).")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder with .png / .jpg images (captions: same-name .txt files)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.result_label)
        layout.addStretch(1)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Images folder", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)

    def validatePage(self) -> bool:
        try:
            report = ft.check_images_folder(self.folder_edit.text().strip() or ".")
        except SnapGenError as exc:
            self.result_label.setText(f"<b>Cannot use this folder:</b> {exc}")
            self.owner.notify(f"Images folder: {exc}", "error")
            return False
        state = self.owner.state
        state.report = report
        state.captions = report.captions()
        state.captions_edited = False
        self.result_label.setText(report.summary())
        if report.unreadable:
            names = ", ".join(n for n, _ in report.unreadable[:3])
            self.owner.notify(
                f"{len(report.unreadable)} images cannot be read and are skipped: {names}", "warning"
            )
        return True


class CaptionsStep(QWizardPage):
    """2. Check and edit captions; missing ones are proposed from the file names."""

    COLUMNS = ("Image", "Caption", "From")

    def __init__(self, owner: WizardPage) -> None:
        super().__init__()
        self.owner = owner
        self.setTitle("2. Captions")
        self.setSubTitle("Edit what each picture shows. Proposed captions (from file names) are marked.")
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.itemChanged.connect(self._on_edit)
        self.summary = QLabel("")
        self.save_button = QPushButton("Save captions to the folder (.txt)")
        self.save_button.setToolTip("Optional: the run uses these captions either way")
        self.save_button.clicked.connect(self.save_to_folder)
        row = QHBoxLayout()
        row.addWidget(self.summary, 1)
        row.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addLayout(row)
        self._filling = False

    def initializePage(self) -> None:
        report = self.owner.state.report
        self._filling = True
        self.table.setRowCount(len(report.images))
        for row, entry in enumerate(report.images):
            name = QTableWidgetItem(entry.name)
            name.setFlags(name.flags() & ~Qt.ItemFlag.ItemIsEditable)
            source = QTableWidgetItem(
                "proposed" if entry.caption_source == "filename" else entry.caption_source
            )
            source.setFlags(source.flags() & ~Qt.ItemFlag.ItemIsEditable)
            self.table.setItem(row, 0, name)
            self.table.setItem(row, 1, QTableWidgetItem(self.owner.state.captions[entry.name]))
            self.table.setItem(row, 2, source)
        self._filling = False
        self.summary.setText(report.summary())

    def _on_edit(self, item: QTableWidgetItem) -> None:
        if self._filling or item.column() != 1:
            return
        name = _cell(self.table, item.row(), 0)
        self.owner.state.captions[name] = item.text()
        self.owner.state.captions_edited = True

    def set_caption(self, name: str, caption: str) -> bool:
        """Edit one caption as a person would (tests)."""
        for row in range(self.table.rowCount()):
            cell = self.table.item(row, 1)
            if _cell(self.table, row, 0) == name and cell is not None:
                cell.setText(caption)
                return True
        return False

    def save_to_folder(self) -> None:
        state = self.owner.state
        try:
            written = ft.write_captions(state.report.folder, state.captions)
        except SnapGenError as exc:
            self.owner.notify(f"Captions not saved: {exc}", "error")
            return
        self.owner.notify(f"saved {len(written)} captions next to the images", "info")

    def validatePage(self) -> bool:
        empty = [n for n, c in self.owner.state.captions.items() if not c.strip()]
        if empty:
            self.owner.notify(
                f"{len(empty)} captions are empty (first: {empty[0]}); describe each picture", "error"
            )
            return False
        return True


class ModelStep(QWizardPage):
    """3. Base model (registered models with a checkpoint, or a folder) and the teacher."""

    def __init__(self, owner: WizardPage) -> None:
        super().__init__()
        self.owner = owner
        self.setTitle("3. Base model and teacher")
        self.setSubTitle(
            "The base model is fine-tuned; the teacher (by default a frozen copy of the base) keeps it close."
        )
        self.base_combo = QComboBox()
        choose = QPushButton("Checkpoint folder…")
        choose.clicked.connect(self._choose_base)
        self.teacher_combo = QComboBox()
        self.teacher_combo.addItem("the base model (frozen copy)", "")
        choose_teacher = QPushButton("Teacher folder…")
        choose_teacher.clicked.connect(self._choose_teacher)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name of the new model, e.g. my-style")
        self.note = QLabel("")
        self.note.setWordWrap(True)
        base_row = QHBoxLayout()
        base_row.addWidget(self.base_combo, 1)
        base_row.addWidget(choose)
        teacher_row = QHBoxLayout()
        teacher_row.addWidget(self.teacher_combo, 1)
        teacher_row.addWidget(choose_teacher)
        form = QFormLayout(self)
        form.addRow("Base model", base_row)
        form.addRow("Teacher", teacher_row)
        form.addRow("New model name", self.name_edit)
        form.addRow(self.note)

    def initializePage(self) -> None:
        self.refresh()
        if not self.name_edit.text():
            folder = Path(self.owner.state.report.folder).name
            try:
                self.name_edit.setText(_model_name(folder + "-style"))
            except SnapGenError:
                self.name_edit.setText("my-style")

    def refresh(self) -> None:
        current = self.base_combo.currentData()
        self.base_combo.clear()
        try:
            bases = ft.base_models(self.owner.registry)
        except Exception as exc:  # an unreadable registry is a message, not a crash
            bases = []
            self.owner.notify(f"cannot list base models: {exc}", "error")
        for base in bases:
            self.base_combo.addItem(f"{base.label}  ({base.checkpoint})", base.label)
        if current and self.base_combo.findData(current) < 0:
            self.base_combo.addItem(current, current)
        if current:
            self.base_combo.setCurrentIndex(self.base_combo.findData(current))
        self.note.setText(
            "" if bases else "No installed model has a training checkpoint: choose a checkpoint folder."
        )

    def add_base_folder(self, folder: str) -> None:
        self.base_combo.addItem(folder, folder)
        self.base_combo.setCurrentIndex(self.base_combo.count() - 1)

    def _choose_base(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Base checkpoint (model_index.json)")
        if folder:
            self.add_base_folder(folder)

    def _choose_teacher(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Teacher UNet folder (diffusers layout)")
        if folder:
            self.teacher_combo.addItem(folder, folder)
            self.teacher_combo.setCurrentIndex(self.teacher_combo.count() - 1)

    def validatePage(self) -> bool:
        choice = self.base_combo.currentData()
        if not choice:
            self.owner.notify(
                "choose a base model (a model with a training checkpoint, or its folder)", "error"
            )
            return False
        try:
            self.owner.state.base = ft.resolve_base(choice, self.owner.registry)
            self.owner.state.base_choice = choice
            _model_name(self.name_edit.text().strip())
        except SnapGenError as exc:
            self.owner.notify(str(exc), "error")
            return False
        self.owner.state.teacher = self.teacher_combo.currentData() or ""
        return True


def _model_name(text: str) -> str:
    """A valid model name or a SnapGenError saying what is allowed."""
    from model_store.errors import StoreError
    from model_store.registry import validate_name

    try:
        return validate_name(text)
    except StoreError as exc:
        raise SnapGenError(exc.message, hint=exc.hint) from None


class SettingsStep(QWizardPage):
    """4. Steps, LoRA rank, resolution, batch, learning rate, seed, sample prompts; the estimate for
    this machine. Next (Start training) is enabled only when the estimate of these settings fits."""

    def __init__(self, owner: WizardPage) -> None:
        super().__init__()
        self.owner = owner
        self.setTitle("4. Settings")
        self.setSubTitle("Estimate first: a run that does not fit this computer's memory is refused.")
        self.steps_spin = _spin(1, 100000, 300)
        self.rank_spin = _spin(0, 256, 8)
        self.rank_spin.setSpecialValueText("0 (full fine-tuning)")
        self.resolution_spin = _spin(16, 2048, 256, 8)
        self.batch_spin = _spin(1, 256, 2)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(0.000001, 0.5)
        self.lr_spin.setSingleStep(0.0001)
        self.lr_spin.setValue(0.0001)
        self.seed_spin = _spin(0, 2**31 - 1, 0)
        self.prompts_edit = QLineEdit()
        self.prompts_edit.setPlaceholderText("sample prompts, separated by ';'")
        self.seeds_edit = QLineEdit("0, 1")
        self.sample_steps_spin = _spin(1, 100, 8)
        self.estimate_button = QPushButton("Estimate time and memory")
        self.estimate_button.clicked.connect(self.run_estimate)
        self.estimate_label = QLabel("No estimate yet.")
        self.estimate_label.setWordWrap(True)
        form = QFormLayout(self)
        form.addRow("Training steps", self.steps_spin)
        form.addRow("LoRA rank", self.rank_spin)
        form.addRow("Resolution (px)", self.resolution_spin)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Sample prompts", self.prompts_edit)
        form.addRow("Sample seeds", self.seeds_edit)
        form.addRow("Sample steps", self.sample_steps_spin)
        form.addRow(self.estimate_button)
        form.addRow(self.estimate_label)
        for spin in (self.steps_spin, self.rank_spin, self.resolution_spin, self.batch_spin, self.seed_spin):
            spin.valueChanged.connect(self.completeChanged)
        self.lr_spin.valueChanged.connect(self.completeChanged)
        self._task: int | None = None

    def initializePage(self) -> None:
        state = self.owner.state
        if not self.prompts_edit.text():
            captions = list(dict.fromkeys(state.captions.values()))[:2]
            self.prompts_edit.setText("; ".join(captions))

    def request(self) -> Any:
        """The FineTuneRequest of the fields (ConfigError when a field is invalid)."""
        state = self.owner.state
        name = self.owner.model_step.name_edit.text().strip()
        seeds = tuple(
            int(s) for s in self.seeds_edit.text().replace(";", ",").split(",") if s.strip().isdigit()
        )
        prompts = tuple(p.strip() for p in self.prompts_edit.text().split(";") if p.strip())
        return ft.FineTuneRequest(
            images_dir=state.report.folder,
            base_model=state.base_choice,
            name=name,
            captions=dict(state.captions) if state.captions_edited else None,
            teacher=state.teacher,
            steps=self.steps_spin.value(),
            lora_rank=self.rank_spin.value(),
            resolution=self.resolution_spin.value(),
            batch_size=self.batch_spin.value(),
            learning_rate=self.lr_spin.value(),
            seed=self.seed_spin.value(),
            sample_prompts=prompts,
            sample_seeds=seeds or (0,),
            sample_steps=self.sample_steps_spin.value(),
            cpu_threads=self.owner.cpu_threads,
        )

    def run_estimate(self) -> int | None:
        """Run the trainer's dry run on a worker; the result (or refusal) lands in the label."""
        try:
            request = self.request()
        except SnapGenError as exc:
            self.owner.notify(str(exc), "error")
            return None
        registry, python = self.owner.registry, self.owner.training_python

        def body(report: Callable[[Event], None], token: CancelToken) -> Any:
            report(Event(kind="started", stage="estimate", message="estimating (starts the training tools)…"))
            return request, ft.estimate(request, python=python, registry=registry, cancel=token)

        self.estimate_label.setText("Estimating… (the training tools take a few seconds to start)")
        self.estimate_button.setEnabled(False)
        self._task = self.owner.run("estimate", body, self._on_estimate)
        return self._task

    def reset(self) -> None:
        """Ready for a new run: an estimate still running for the last one was cancelled by the
        wizard, and its result is dropped, so the button and label are set here."""
        self._task = None
        self.estimate_button.setEnabled(True)
        self.estimate_label.setText("")

    def _on_estimate(self, message: TaskMessage) -> None:
        self.estimate_button.setEnabled(True)
        state = self.owner.state
        if message.kind != "finished":
            state.estimate, state.estimate_for = None, None
            text = message.error or "estimate cancelled"
            self.estimate_label.setText(f"<b>Refused:</b> {text}")
            self.owner.notify(f"This run cannot start: {text}", "error")
        else:
            request, est = message.result
            state.estimate, state.estimate_for = est, request
            verdict = "fits" if est.fits else "does NOT fit"
            self.estimate_label.setText(
                f"About {est.memory_gib:.2f} GiB of memory ({verdict}: {est.available_gib:.1f} GiB available), "
                f"{_duration(est.total_seconds)} of training ({est.seconds_per_step:.3g} s/step) plus about a "
                f"minute to start and to export; {est.params_m:.2f} M parameters, {est.trainable_m:.2f} M trained."
            )
            if not est.fits:
                self.owner.notify(
                    "this run does not fit this computer's memory: lower the resolution or batch", "error"
                )
        self.completeChanged.emit()

    def isComplete(self) -> bool:
        state = self.owner.state
        if state.estimate is None or not state.estimate.fits:
            return False
        try:
            return self.request() == state.estimate_for
        except SnapGenError:
            return False

    def validatePage(self) -> bool:
        try:
            request = self.request()
            handle = ft.start(request, python=self.owner.training_python, registry=self.owner.registry)
        except SnapGenError as exc:
            self.owner.notify(f"Training did not start: {exc}", "error")
            return False
        self.owner.state.request = request
        self.owner.state.handle = handle
        self.owner.notify(
            f"training {request.name} started (it keeps running if you close the window)", "info"
        )
        return True


def _spin(low: int, high: int, value: int, step: int = 1) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setSingleStep(step)
    spin.setValue(value)
    return spin


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class TrainStep(QWizardPage):
    """5. Training: progress, live loss curves, samples at fixed seeds, pause/resume/cancel."""

    def __init__(self, owner: WizardPage) -> None:
        super().__init__()
        self.owner = owner
        self.setTitle("5. Training")
        self.setSubTitle("Runs in the background: you can close the window and come back.")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.plot = LossPlot()
        self.samples_row = QHBoxLayout()
        samples = QWidget()
        samples.setLayout(self.samples_row)
        scroll = QScrollArea()
        scroll.setWidget(samples)
        scroll.setWidgetResizable(True)
        scroll.setFixedHeight(THUMB + 40)
        self.pause_button = QPushButton("Pause")
        self.pause_button.clicked.connect(self.pause_or_resume)
        self.cancel_button = QPushButton("Cancel run")
        self.cancel_button.clicked.connect(self.cancel_run)
        self.start_over_button = QPushButton("Start over")
        self.start_over_button.setToolTip("Set up a new run from step 1 (this run's folder is kept)")
        self.start_over_button.clicked.connect(self.start_over)
        self.start_over_button.hide()  # offered when a run failed
        buttons = QHBoxLayout()
        buttons.addWidget(self.progress, 1)
        buttons.addWidget(self.pause_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.start_over_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        layout.addWidget(self.plot, 1)
        layout.addWidget(QLabel("Samples at fixed seeds (newest last):"))
        layout.addWidget(scroll)
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self._shown_samples: set[str] = set()
        self.last_state = ""

    def initializePage(self) -> None:
        self.plot.clear()
        self._shown_samples.clear()
        while self.samples_row.count():
            item = self.samples_row.takeAt(0)
            widget = item.widget() if item is not None else None
            if widget is not None:
                widget.deleteLater()
        handle = self.owner.state.handle
        if handle is not None:
            self._apply(handle.history)  # a reattached run: its whole history so far
        self.timer.start()
        self.poll()

    def cleanupPage(self) -> None:
        self.timer.stop()

    @Slot()
    def poll(self) -> None:
        handle = self.owner.state.handle
        if handle is None:
            return
        self._apply(handle.poll())
        state = handle.state()
        if state != self.last_state:
            self.last_state = state
            self._on_state(state)
            self.completeChanged.emit()

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            if event.kind == "progress":
                if isinstance(event.data.get("loss"), dict):
                    self.plot.add(event.step, event.data["loss"])
                self.progress.setRange(0, max(1, event.total))
                self.progress.setValue(event.step)
                eta = f", about {_duration(event.eta_s)} left" if event.eta_s else ""
                self.status.setText(f"step {event.step} of {event.total}{eta}")
            elif event.kind == "preview":
                for path in event.data.get("samples", []):
                    self._add_sample(str(path), event.step)
            elif event.kind in ("log", "started") and event.message:
                self.status.setText(event.message)

    def _add_sample(self, path: str, step: int) -> None:
        if path in self._shown_samples:
            return
        self._shown_samples.add(path)
        caption = f"step {step}"
        handle = self.owner.state.handle
        found = re.search(r"-s(\d+)\.png$", path)  # the trainer names samples ...-p{prompt}-s{seed index}.png
        if handle is not None and found and int(found.group(1)) < len(handle.request.sample_seeds):
            caption += f" · seed {handle.request.sample_seeds[int(found.group(1))]}"
        box = QWidget()
        column = QVBoxLayout(box)
        column.setContentsMargins(2, 2, 2, 2)
        column.addWidget(_image_label(path))
        column.addWidget(QLabel(caption), 0, Qt.AlignmentFlag.AlignHCenter)
        self.samples_row.addWidget(box)

    def sample_count(self) -> int:
        return len(self._shown_samples)

    def _on_state(self, state: str) -> None:
        handle = self.owner.state.handle
        running = state in ("running", "starting")
        self.pause_button.setText("Pause" if running else "Retry" if state == "failed" else "Resume")
        self.pause_button.setEnabled(state in ("running", "starting", "paused", "cancelled", "failed"))
        self.cancel_button.setEnabled(running)
        self.start_over_button.setVisible(state == "failed")
        if state == "finished":
            self.timer.stop()
            self.status.setText("Training finished. Next: compare with the base model.")
            self.owner.notify(f"training of {handle.name} finished", "info")
        elif state == "failed":
            self.timer.stop()
            self._show_failure(handle)
        elif state == "starting":
            self.status.setText("Starting the training tools…")
        elif state in ("paused", "cancelled"):
            self.status.setText(
                f"Training {state} at step {self.progress.value()} (checkpoint kept; Resume continues)."
            )

    def _show_failure(self, handle: Any) -> None:
        """The cause (escaped: tracebacks hold <module>), the end of the trainer's log, and what the
        person can do; the images already generated and the run's checkpoints are untouched."""
        why = handle.failure()
        tail = handle.log_tail(lines=5)
        shown = bool(tail) and tail[-1] in why  # failure() already quotes the log's end
        log = "" if shown else "".join(f"<br><tt>{html.escape(line)}</tt>" for line in tail)
        self.status.setText(
            f"<b>Training failed:</b> {html.escape(why)}"
            + (f"<br>Last lines of the trainer's log:{log}" if log else "")
            + "<br>Retry continues from the last checkpoint (if one was written); "
            "Start over sets up a new run."
        )
        self.owner.notify(
            f"Training of {handle.name} failed: {why}. Retry it, or start over with a new run.", "error"
        )

    def start_over(self) -> None:
        """A new run from step 1, with this run's images folder filled in."""
        handle = self.owner.state.handle
        self.owner.new_run()
        if handle is not None:
            self.owner.folder_step.folder_edit.setText(handle.request.images_dir)

    def pause_or_resume(self) -> None:
        handle = self.owner.state.handle
        if handle is None:
            return
        if handle.alive():
            handle.pause()
            self.status.setText("Pausing after the current step (writing a checkpoint)…")
            return
        try:
            handle.resume(self.owner.training_python)
        except SnapGenError as exc:
            self.owner.notify(f"Cannot resume: {exc}", "error")
            return
        self.last_state = ""
        self.timer.start()
        self.owner.notify(f"training {handle.name} resumed", "info")

    def cancel_run(self) -> None:
        handle = self.owner.state.handle
        if handle is not None and handle.cancel():
            self.status.setText("Cancelling after the current step…")

    def isComplete(self) -> bool:
        handle = self.owner.state.handle
        return handle is not None and self.last_state == "finished"


class CompareStep(QWizardPage):
    """6. Side by side: the base model and the fine-tuned one on the same prompts and seeds
    (exports the fine-tuned bundle, int8 + fp32, and the base when it has no bundle)."""

    def __init__(self, owner: WizardPage) -> None:
        super().__init__()
        self.owner = owner
        self.setTitle("6. Compare with the base model")
        self.setSubTitle("Same prompts, same seeds: left the base model, right your fine-tuned model.")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.grid = QGridLayout()
        holder = QWidget()
        holder.setLayout(self.grid)
        scroll = QScrollArea()
        scroll.setWidget(holder)
        scroll.setWidgetResizable(True)
        self.retry_button = QPushButton("Try the comparison again")
        self.retry_button.hide()
        self.retry_button.clicked.connect(self.run_comparison)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.retry_button)
        layout.addWidget(scroll, 1)
        self.done = False
        self._task: int | None = None

    def initializePage(self) -> None:
        if not self.done and self._task is None:
            self.run_comparison()

    def reset(self) -> None:
        """Empty, for a new run: no rows of the last run's comparison stay in the grid."""
        self.done = False
        self._task = None
        self.retry_button.hide()
        while self.grid.count():
            item = self.grid.takeAt(0)
            if item is not None and item.widget() is not None:
                item.widget().deleteLater()

    def run_comparison(self) -> int:
        state = self.owner.state
        handle = state.handle
        run_dir, request = handle.run_dir, handle.request
        python = self.owner.training_python
        settings, base_settings = self.owner.export_settings, self.owner.base_export_settings
        registry = self.owner.registry

        def body(report: Callable[[Event], None], token: CancelToken) -> list[tuple[str, int, str, str]]:
            report(
                Event(kind="started", stage="export", message="exporting the fine-tuned model (int8 + fp32)…")
            )
            tuned = ft.export_run(run_dir, settings, python=python, on_event=report, cancel=token)
            report(Event(kind="log", stage="export", message="preparing the base model…"))
            base = ft.base_bundle(run_dir, base_settings, python=python, on_event=report, cancel=token)
            rows = []
            pairs = ft.comparison_settings(request)
            for index, (prompt, seed) in enumerate(pairs):
                paths = []
                for side, model in (("base", base), ("tuned", str(tuned))):
                    generation = GenerationRequest(
                        prompt=prompt,
                        model=model,
                        seed=seed,
                        width=request.resolution,
                        height=request.resolution,
                        steps=request.sample_steps,
                        precision=_shared_precision(model, registry),
                        output_dir=str(run_dir / "compare" / side),
                    )
                    paths.append(service.generate(generation, cancel=token).images[0])
                report(Event(kind="progress", stage="compare", step=index + 1, total=len(pairs)))
                rows.append((prompt, seed, paths[0], paths[1]))
            return rows

        self.reset()  # a retry starts from an empty grid too
        self.status.setText("Exporting and generating the comparison…")
        self._task = self.owner.run("compare", body, self._on_done, self._on_progress)
        return self._task

    def _on_progress(self, event: Event) -> None:
        if event.message:
            self.status.setText(event.message)
        elif event.total:
            self.status.setText(f"comparison image {event.step} of {event.total}")

    def _on_done(self, message: TaskMessage) -> None:
        self._task = None
        if message.kind != "finished":
            self.retry_button.show()
            self.status.setText(f"<b>Comparison failed:</b> {message.error or 'cancelled'}")
            self.owner.notify(f"Comparison failed: {message.error or 'cancelled'}", "error")
            return
        self.owner.state.comparison = message.result
        self.grid.addWidget(QLabel("<b>Prompt (seed)</b>"), 0, 0)
        self.grid.addWidget(QLabel("<b>Base</b>"), 0, 1)
        self.grid.addWidget(QLabel("<b>Fine-tuned</b>"), 0, 2)
        for row, (prompt, seed, base, tuned) in enumerate(message.result, start=1):
            change = _mean_abs_difference(base, tuned)
            label = QLabel(f"{prompt}\n(seed {seed})\nchanged: mean |Δ| {change:.1f} of 255")
            label.setWordWrap(True)
            self.grid.addWidget(label, row, 0)
            self.grid.addWidget(_image_label(base, 160), row, 1)
            self.grid.addWidget(_image_label(tuned, 160), row, 2)
        self.grid.setRowStretch(len(message.result) + 1, 1)  # rows stay at the top
        self.grid.setColumnStretch(3, 1)
        self.done = True
        self.status.setText("Exported (int8 + fp32, parity-checked). Next: register the model.")
        self.completeChanged.emit()

    def isComplete(self) -> bool:
        return self.done


def _mean_abs_difference(a: str, b: str) -> float:
    """Mean absolute pixel difference of two same-size PNGs (0-255): how much fine-tuning changed
    the picture of one prompt and seed."""
    import numpy as np
    from PIL import Image

    with Image.open(a) as first, Image.open(b) as second:
        if first.size != second.size:
            return float("nan")
        x = np.asarray(first.convert("RGB"), dtype=np.float32)
        y = np.asarray(second.convert("RGB"), dtype=np.float32)
    return float(np.abs(x - y).mean())


def _shared_precision(model: str, registry: Registry) -> Literal["auto", "fp32"]:
    """fp32 when the bundle has it (both sides at the same precision), else auto."""
    from model_store.bundle import read_manifest
    from model_store.errors import StoreError

    path = Path(model)
    try:
        if not (path / "bundle.json").is_file():
            path = registry.resolve(model).path
        return "fp32" if "fp32" in read_manifest(path).precisions else "auto"
    except StoreError:
        return "auto"


class RegisterStep(QWizardPage):
    """7. Register the exported bundle in the model store; it appears in the model picker."""

    def __init__(self, owner: WizardPage) -> None:
        super().__init__()
        self.owner = owner
        self.setTitle("7. Register")
        self.setSubTitle("The quantized model goes into your model store and the Generate page's picker.")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.register_button = QPushButton("Register the model")
        self.register_button.clicked.connect(self.register)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.register_button)
        layout.addStretch(1)
        self._task: int | None = None

    def initializePage(self) -> None:
        handle = self.owner.state.handle
        self.status.setText(f"Model name: <b>{handle.name}</b> — bundle in {handle.bundle_dir}")
        self.register_button.setEnabled(self.owner.state.registered is None)

    def register(self) -> int | None:
        if self._task is not None or self.owner.state.registered is not None:
            return None
        handle = self.owner.state.handle
        run_dir, registry, python = handle.run_dir, self.owner.registry, self.owner.training_python
        settings = self.owner.export_settings

        def body(report: Callable[[Event], None], token: CancelToken) -> RegisteredModel:
            return ft.finish(
                run_dir, settings=settings, python=python, registry=registry, on_event=report, cancel=token
            )

        self.register_button.setEnabled(False)
        self.status.setText("Registering…")
        self._task = self.owner.run("register", body, self._on_done)
        return self._task

    def _on_done(self, message: TaskMessage) -> None:
        self._task = None
        if message.kind != "finished":
            self.register_button.setEnabled(True)
            self.status.setText(f"<b>Not registered:</b> {message.error or 'cancelled'}")
            self.owner.notify(f"Registering failed: {message.error or 'cancelled'}", "error")
            return
        model: RegisteredModel = message.result
        self.owner.state.registered = model
        self.status.setText(
            f"Registered <b>{model.name}</b> ({', '.join(model.variants)}). Pick it on Generate."
        )
        self.owner.notify(f"model {model.name!r} registered: it is in the model picker now", "info")
        self.owner.modelsChanged.emit()
        self.completeChanged.emit()

    def isComplete(self) -> bool:
        return self.owner.state.registered is not None


# -- the page ---------------------------------------------------------------------------------------------


class WizardPage(QWidget):
    """Hosts the QWizard; ``modelsChanged`` after a registration (the window refreshes the picker).

    ``export_settings`` / ``base_export_settings`` are the ``snapgen export`` arguments (tests use
    fewer calibration runs); ``training_python`` the interpreter with the train extra ("" = find it).
    """

    modelsChanged = Signal()

    def __init__(
        self,
        controller: Controller,
        registry: Callable[[], Registry],
        settings: AppSettings,
        notify: Notify,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.controller = controller
        self._registry = registry
        self.settings = settings
        self.notify = notify
        self.export_settings = ft.ExportSettings()
        self.base_export_settings = ft.ExportSettings(precisions=("fp32",))
        self.cpu_threads = 0
        self.state = WizardState()
        self._callbacks: dict[int, tuple[Callable[[TaskMessage], None], Callable[[Event], None] | None]] = {}
        controller.message.connect(self._on_message)
        self.header = QLabel("")
        self.header.setWordWrap(True)
        self.new_button = QPushButton("New run")
        self.new_button.clicked.connect(self.new_run)
        self._new_run_requested = False
        top = QHBoxLayout()
        top.addWidget(self.header, 1)
        top.addWidget(self.new_button)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        self._build_wizard()
        layout.addWidget(self.wizard, 1)
        self.reattach()

    def _build_wizard(self) -> None:
        self.wizard = QWizard(self)
        self.wizard.setWindowFlags(Qt.WindowType.Widget)  # embedded in the page, not a dialog
        self.wizard.setWizardStyle(QWizard.WizardStyle.ClassicStyle)
        self.wizard.setOption(QWizard.WizardOption.NoCancelButton, True)
        self.wizard.setOption(QWizard.WizardOption.NoBackButtonOnLastPage, True)
        self.wizard.setButtonText(QWizard.WizardButton.FinishButton, "Done")
        self.folder_step = FolderStep(self)
        self.captions_step = CaptionsStep(self)
        self.model_step = ModelStep(self)
        self.settings_step = SettingsStep(self)
        self.train_step = TrainStep(self)
        self.compare_step = CompareStep(self)
        self.register_step = RegisterStep(self)
        for index, step in enumerate(
            (
                self.folder_step,
                self.captions_step,
                self.model_step,
                self.settings_step,
                self.train_step,
                self.compare_step,
                self.register_step,
            )
        ):
            self.wizard.setPage(index, step)
        # starting the run commits: no going back to the settings of a run that exists
        self.settings_step.setCommitPage(True)
        self.settings_step.setButtonText(QWizard.WizardButton.CommitButton, "Start training")
        self.train_step.setButtonText(QWizard.WizardButton.NextButton, "Compare >")
        self.compare_step.setButtonText(QWizard.WizardButton.NextButton, "Register >")
        self.wizard.finished.connect(lambda _r: self.restart())

    @property
    def registry(self) -> Registry:
        return self._registry()

    @property
    def training_python(self) -> str | None:
        return self.settings.training_python or None

    # -- runs ---------------------------------------------------------------------------------------

    def reattach(self) -> bool:
        """Show the newest run that is running (or stopped, or finished and not registered yet) on the
        training step. False when there is none (the wizard starts at step 1)."""
        try:
            handle = ft.running_run()
        except SnapGenError as exc:
            self.notify(f"cannot read the training runs: {exc}", "error")
            return False
        if handle is None:
            if self.wizard.currentId() < 0:
                self.restart()
            return False
        self.attach(handle)
        return True

    def attach(self, handle: Any) -> None:
        """Jump to the training step of ``handle`` (a RunHandle)."""
        self.state = WizardState()
        self.state.handle = handle
        self.state.request = handle.request
        self.header.setText(f"Run <b>{handle.name}</b> in {handle.run_dir} — {handle.state()}")
        self.wizard.restart()
        # walk to the training step without the validations of the earlier steps
        self.wizard.setStartId(TRAIN)
        self.wizard.restart()
        self.wizard.setStartId(FOLDER)

    def on_shown(self) -> None:
        """The page came into view: pick up a run started meanwhile, unless the person is filling in
        a new run (they pressed New run, or they are past step 1)."""
        if (
            self.state.handle is None
            and not self._new_run_requested
            and self.wizard.currentId() in (-1, FOLDER)
        ):
            self.reattach()

    def new_run(self) -> None:
        """The New run button: a fresh wizard; running runs keep going (and stay in runs/)."""
        self._new_run_requested = True
        self.restart()

    def restart(self) -> None:
        """A fresh wizard at step 1 (a run already going keeps going)."""
        self.train_step.timer.stop()
        # Tasks of the run being left (its comparison, its registration) are cancelled and their
        # results dropped: delivered later they would land in the new run's state.
        for task_id in list(self._callbacks):
            self.controller.cancel(task_id)
        self._callbacks.clear()
        self.state = WizardState()
        self.settings_step.reset()
        self.compare_step.reset()
        self.register_step._task = None
        self.wizard.setStartId(FOLDER)
        self.wizard.restart()
        self.wizard.show()  # Done (accept) hides a QWizard
        self.header.setText("Fine-tune a model on your own pictures. Runs live in " + str(ft.runs_dir()))

    def shutdown(self) -> None:
        """Stop watching (the run itself keeps going)."""
        self.train_step.timer.stop()

    # -- tasks ----------------------------------------------------------------------------------------

    def run(
        self,
        task: str,
        body: Callable[[Callable[[Event], None], CancelToken], Any],
        done: Callable[[TaskMessage], None],
        progress: Callable[[Event], None] | None = None,
    ) -> int:
        task_id = self.controller.run_task(task, body, cancel_on_report=False)
        self._callbacks[task_id] = (done, progress)
        return task_id

    @Slot(object)
    def _on_message(self, message: TaskMessage) -> None:
        callbacks = self._callbacks.get(message.task_id)
        if callbacks is None:
            return
        done, progress = callbacks
        if message.kind == "event" and message.event is not None and progress is not None:
            progress(message.event)
        elif message.is_terminal:
            del self._callbacks[message.task_id]
            done(message)
