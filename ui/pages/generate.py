"""The generate screen: prompt and settings, queue, progress with a live preview, cancel."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QImage, QRegularExpressionValidator
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from model_store.registry import RegisteredModel
from snapgen_app import service
from snapgen_app.api import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SHIFT,
    MAX_SIZE,
    MAX_STEPS,
    GenerationRequest,
    GenerationResult,
    StepEvent,
)
from snapgen_app.errors import SnapGenError
from ui.app_settings import AppSettings
from ui.controller import GENERATE_TASK, Controller, TaskMessage
from ui.extras import available_devices
from ui.widgets.image_view import qimage_from_rgb, scaled_pixmap
from ui.widgets.prompt_edit import PromptEdit

Notify = Callable[[str, str], None]  # (text, level)
DEFAULT = "model default"
DEFAULT_STRIDE = 32  # the SnapGen presets' size stride, until a model says otherwise
SEED_RANDOM, SEED_FIXED = "Random", "Fixed"
PREVIEW_SIZE = 384


class GeneratePage(QWidget):
    """Builds GenerationRequests from its fields, queues them on the controller and shows progress.

    ``imagesGenerated(paths)`` fires when a job wrote its PNGs.
    """

    imagesGenerated = Signal(list)

    def __init__(
        self, controller: Controller, settings: AppSettings, notify: Notify, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.controller = controller
        self.settings = settings
        self.notify = notify
        self.models: dict[str, RegisteredModel] = {}
        self.last_result: GenerationResult | None = None
        self.last_step = 0
        self._build()
        self.prompt_edit.set_history(settings.prompt_history())
        controller.message.connect(self._on_message)
        controller.queueChanged.connect(self._refresh_queue)
        self._refresh_queue()

    # -- layout --------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.prompt_edit = PromptEdit()
        self.prompt_edit.setMaximumHeight(110)
        self.prompt_edit.submitted.connect(self.submit)

        self.model_combo = QComboBox()
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.device_combo = QComboBox()
        self.device_combo.addItem("auto (best available)", "auto")
        for choice in available_devices():
            self.device_combo.addItem(f"{choice.device} ({choice.provider})", choice.device)
        self._select(self.device_combo, self.settings.device)
        self.precision_combo = QComboBox()
        self.precision_combo.addItem("auto", "auto")

        self.steps_spin = _optional_spin(0, MAX_STEPS, 1)
        self._stride = DEFAULT_STRIDE
        self._started: int | None = None  # the job whose start this page has seen
        self._cancelling: int | None = None  # the job Cancel was pressed for
        self.width_spin = _optional_spin(0, MAX_SIZE, DEFAULT_STRIDE)
        self.height_spin = _optional_spin(0, MAX_SIZE, DEFAULT_STRIDE)
        size_row = QHBoxLayout()
        size_row.addWidget(self.width_spin)
        size_row.addWidget(QLabel("×"))
        size_row.addWidget(self.height_spin)

        self.seed_mode = QComboBox()
        self.seed_mode.addItems([SEED_RANDOM, SEED_FIXED])
        self.seed_mode.currentTextChanged.connect(self._on_seed_mode)
        self.seed_edit = QLineEdit()
        self.seed_edit.setValidator(QRegularExpressionValidator(r"\d{0,19}"))
        self.seed_edit.setPlaceholderText("seed")
        self.reuse_seed_button = QPushButton("Reuse last")
        self.reuse_seed_button.setToolTip("Fix the seed of the last generated image")
        self.reuse_seed_button.clicked.connect(self.reuse_last_seed)
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.seed_mode)
        seed_row.addWidget(self.seed_edit, 1)
        seed_row.addWidget(self.reuse_seed_button)

        self.count_spin = QSpinBox()
        self.count_spin.setRange(1, MAX_IMAGES)
        # The ranges of a GenerationRequest (so settings reused from any PNG fit), 3 decimals.
        self.shift_spin = QDoubleSpinBox()
        self.shift_spin.setDecimals(3)
        self.shift_spin.setRange(0.0, MAX_SHIFT)
        self.shift_spin.setSingleStep(0.5)
        self.shift_spin.setSpecialValueText(DEFAULT)
        self.guidance_spin = QDoubleSpinBox()
        self.guidance_spin.setDecimals(3)
        self.guidance_spin.setRange(-0.5, MAX_GUIDANCE)
        self.guidance_spin.setSingleStep(0.5)
        self.guidance_spin.setSpecialValueText(DEFAULT)
        self.guidance_spin.setValue(-0.5)

        form = QFormLayout()
        form.addRow("Model", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Size (W × H)", size_row)
        form.addRow("Seed", seed_row)
        form.addRow("Images", self.count_spin)
        form.addRow("Shift", self.shift_spin)
        form.addRow("Guidance", self.guidance_spin)

        self.generate_button = QPushButton("Generate  (Ctrl+Enter)")
        self.generate_button.setDefault(True)
        self.generate_button.clicked.connect(self.submit)
        self.cancel_button = QPushButton("Cancel  (Esc)")
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button, 1)
        buttons.addWidget(self.cancel_button)

        self.queue_list = QListWidget()
        self.queue_list.setMaximumHeight(120)
        self.up_button = QPushButton("Up")
        self.down_button = QPushButton("Down")
        self.remove_button = QPushButton("Remove")
        self.up_button.clicked.connect(lambda: self._move_selected(-1))
        self.down_button.clicked.connect(lambda: self._move_selected(+1))
        self.remove_button.clicked.connect(self._remove_selected)
        queue_buttons = QHBoxLayout()
        for button in (self.up_button, self.down_button, self.remove_button):
            queue_buttons.addWidget(button)
        queue_box = QGroupBox("Queue")
        queue_layout = QVBoxLayout(queue_box)
        queue_layout.addWidget(self.queue_list)
        queue_layout.addLayout(queue_buttons)

        left = QVBoxLayout()
        left.addWidget(QLabel("Prompt"))
        left.addWidget(self.prompt_edit)
        left.addLayout(form)
        left.addLayout(buttons)
        left.addWidget(queue_box)
        left.addStretch(1)

        self.preview_label = QLabel("The live preview appears here while an image is generated.")
        self.preview_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview_label.setMinimumSize(256, 256)
        self.preview_label.setStyleSheet("QLabel { border: 1px solid palette(mid); }")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("idle")
        self.status_label = QLabel("Ready")
        self.status_label.setWordWrap(True)
        right = QVBoxLayout()
        right.addWidget(self.preview_label, 1)
        right.addWidget(self.progress_bar)
        right.addWidget(self.status_label)

        root = QHBoxLayout(self)
        root.addLayout(left, 2)
        root.addLayout(right, 3)
        self._on_seed_mode(SEED_RANDOM)
        self._set_running(False)

    # -- models --------------------------------------------------------------------------------------

    def set_models(self, models: Sequence[RegisteredModel]) -> None:
        """Fill the model picker with the models that have a runtime bundle (keeps the selection)."""
        current = self.model_combo.currentData()
        self.models = {m.name: m for m in models if m.has_bundle}
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for name, model in self.models.items():
            self.model_combo.addItem(f"{name}  [{', '.join(model.variants) or 'incomplete'}]", name)
        if not self.models:
            self.model_combo.addItem("no model installed (see Models)", "")
        self.model_combo.blockSignals(False)
        if not self._select(self.model_combo, current or "") and current:
            now = self.model_combo.currentData() or "none"
            self.notify(f"model {current!r} is no longer installed; Generate now uses {now!r}", "warning")
        self._on_model_changed()

    def _on_model_changed(self) -> None:
        model = self.models.get(self.model_combo.currentData() or "")
        keep = self.precision_combo.currentData()
        self.precision_combo.clear()
        self.precision_combo.addItem("auto", "auto")
        for variant in model.variants if model else ():
            self.precision_combo.addItem(variant, variant)
        self._select(self.precision_combo, keep or "auto")
        # Sizes step by what the model's UNet can halve down to (32 px for the SnapGen presets).
        self._stride = DEFAULT_STRIDE
        if model is not None:
            with contextlib.suppress(SnapGenError):  # a damaged bundle says so when it is used
                self._stride = service.size_stride_of(model.name)
        for spin in (self.width_spin, self.height_spin):
            spin.setSingleStep(self._stride)

    # -- request <-> fields ----------------------------------------------------------------------------

    def request_from_fields(self) -> GenerationRequest:
        """The request the fields describe. Raises SnapGenError (a readable message) when invalid."""
        prompt = self.prompt_edit.prompt()
        if not prompt.strip():
            raise SnapGenError("the prompt is empty", hint="describe the image you want, e.g. 'a red apple'")
        model = self.model_combo.currentData() or ""
        if not model:
            raise SnapGenError(
                "no model is installed", hint="download or import one on the Models page (Ctrl+3)"
            )
        seed: int | None = None
        if self.seed_mode.currentText() == SEED_FIXED:
            text = self.seed_edit.text().strip()
            if not text:
                raise SnapGenError("the seed is empty", hint="type a number, or choose Random")
            seed = int(text)
        for name, spin in (("width", self.width_spin), ("height", self.height_spin)):
            if spin.value() % self._stride:  # said now, not when the job's turn comes
                raise SnapGenError(
                    f"the {name} {spin.value()} is not a multiple of {self._stride}",
                    hint=f"this model takes sizes in steps of {self._stride} px",
                )
        output = self.settings.output_dir()
        return GenerationRequest(
            prompt=prompt,
            model=model,
            steps=self.steps_spin.value() or None,
            seed=seed,
            width=self.width_spin.value() or None,
            height=self.height_spin.value() or None,
            num_images=self.count_spin.value(),
            precision=self.precision_combo.currentData() or "auto",
            device=self.device_combo.currentData() or "auto",
            shift=self.shift_spin.value() or None,
            guidance_scale=self.guidance_spin.value() if self.guidance_spin.value() >= 0 else None,
            preview=True,
            threads=self.settings.threads or None,
            output_dir=str(output),
        )

    def apply_request(self, request: GenerationRequest) -> list[str]:
        """Set every field from ``request``; returns warnings for values this machine cannot use."""
        warnings: list[str] = []
        self.prompt_edit.setPlainText(request.prompt)
        if request.model and request.model not in self.models:
            warnings.append(
                f"model {request.model!r} is not installed; keeping {self.model_combo.currentData()!r}"
            )
        else:
            self._select(self.model_combo, request.model)
        if not self._select(self.device_combo, request.device):
            warnings.append(f"device {request.device!r} is not available here; using auto")
            self._select(self.device_combo, "auto")
        if not self._select(self.precision_combo, request.precision):
            warnings.append(f"precision {request.precision!r} is not installed for this model; using auto")
            self._select(self.precision_combo, "auto")
        self.steps_spin.setValue(request.steps or 0)
        self.width_spin.setValue(request.width or 0)
        self.height_spin.setValue(request.height or 0)
        if request.seed is None:
            self.seed_mode.setCurrentText(SEED_RANDOM)
        else:
            self.seed_mode.setCurrentText(SEED_FIXED)
            self.seed_edit.setText(str(request.seed))
        self.count_spin.setValue(request.num_images)
        self.shift_spin.setValue(request.shift or 0.0)
        self.guidance_spin.setValue(request.guidance_scale if request.guidance_scale is not None else -0.5)
        return warnings

    @staticmethod
    def _select(combo: QComboBox, data: str) -> bool:
        index = combo.findData(data)
        if index >= 0:
            combo.setCurrentIndex(index)
        return index >= 0

    def _on_seed_mode(self, mode: str) -> None:
        fixed = mode == SEED_FIXED
        self.seed_edit.setEnabled(fixed)
        if fixed and not self.seed_edit.text():
            self.seed_edit.setText(str(random.randrange(2**32)))

    def reuse_last_seed(self) -> None:
        """Fix the seed to the first seed of the last result (a no-op before any result)."""
        if self.last_result is None:
            self.notify("nothing generated yet, so there is no seed to reuse", "info")
            return
        self.seed_mode.setCurrentText(SEED_FIXED)
        self.seed_edit.setText(str(self.last_result.seeds[0]))

    # -- actions -------------------------------------------------------------------------------------

    @Slot()
    def submit(self) -> int | None:
        """Queue a generation from the fields; bad fields become a message. Returns the job id."""
        try:
            request = self.request_from_fields()
        except SnapGenError as exc:
            self.notify(f"Cannot generate: {exc}", "error")
            return None
        except ValueError as exc:
            self.notify(f"Cannot generate: {exc}", "error")
            return None
        self.prompt_edit.remember(request.prompt)
        self.settings.set_prompt_history(self.prompt_edit.history)
        return self.controller.enqueue(request)

    @Slot()
    def cancel(self) -> None:
        current = self.controller.current_job
        # Only a job whose start this page has shown, once (the button, Esc and the menu all come
        # here): a press while the cancelled job stops, or in the instant the next one takes its
        # place, was meant for the old job and must not cancel the new one.
        if current is None or current.job_id != self._started or current.job_id == self._cancelling:
            return
        if self.controller.cancel_job(current.job_id):
            self._cancelling = current.job_id
            self.cancel_button.setEnabled(False)  # until the next job reports that it started
            self.status_label.setText("Cancelling…")

    def _selected_job(self) -> int | None:
        item = self.queue_list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None

    def _move_selected(self, offset: int) -> None:
        job_id = self._selected_job()
        if job_id is not None and self.controller.move_job(job_id, offset):
            self._select_job(job_id)

    def _remove_selected(self) -> None:
        job_id = self._selected_job()
        if job_id is None:
            return
        if self.controller.current_job is not None and self.controller.current_job.job_id == job_id:
            self.cancel()
        else:
            self.controller.remove_job(job_id)

    def _select_job(self, job_id: int) -> None:
        for row in range(self.queue_list.count()):
            if self.queue_list.item(row).data(Qt.ItemDataRole.UserRole) == job_id:
                self.queue_list.setCurrentRow(row)

    @Slot()
    def _refresh_queue(self) -> None:
        selected = self._selected_job()
        self.queue_list.clear()
        current = self.controller.current_job
        if current is not None:
            item = QListWidgetItem(f"▶ {current.label()}  (running)")
            item.setData(Qt.ItemDataRole.UserRole, current.job_id)
            self.queue_list.addItem(item)
        for job in self.controller.pending_jobs:
            item = QListWidgetItem(job.label())
            item.setData(Qt.ItemDataRole.UserRole, job.job_id)
            self.queue_list.addItem(item)
        if selected is not None:
            self._select_job(selected)
        self._set_running(current is not None)

    def _set_running(self, running: bool) -> None:
        current = self.controller.current_job
        # A job is cancellable once its own start has reached this page (not while the one just
        # cancelled is still being taken down, nor in the instant the next one is queued to run).
        self.cancel_button.setEnabled(running and current is not None and current.job_id == self._started)

    # -- progress ------------------------------------------------------------------------------------

    @Slot(object)
    def _on_message(self, message: TaskMessage) -> None:
        if message.task != GENERATE_TASK:
            return
        if message.kind == "started":
            self._started = message.task_id
            self._set_running(True)
            self.last_step = 0
            self.progress_bar.setValue(0)
            self.progress_bar.setFormat("step %v / %m")
            self.status_label.setText("Loading the model…")
        elif message.kind == "event" and message.event is not None:
            self._on_event(message)
        elif message.kind == "finished":
            self._on_finished(message.result)
        elif message.kind == "cancelled":
            self.status_label.setText(f"Cancelled after step {self.last_step}")
            self.notify(
                f"generation #{message.task_id} cancelled after step {self.last_step}; nothing was written",
                "info",
            )
        elif message.kind == "error":
            self.status_label.setText("Failed")
            self.notify(f"Generation failed: {message.error}", "error")

    def _on_event(self, message: TaskMessage) -> None:
        event = message.event
        assert event is not None
        if event.kind == "started":
            self.progress_bar.setRange(0, max(1, event.total))
            self.status_label.setText(event.message)
        elif event.kind == "log":
            self.notify(event.message, "warning")
        elif event.kind == "progress":
            try:
                step = StepEvent.from_event(event)
            except ValueError:
                return
            self.last_step = step.step
            self.progress_bar.setRange(0, step.total)
            self.progress_bar.setValue(step.step)
            eta = f", about {event.eta_s:.1f} s left" if event.eta_s is not None else ""
            self.status_label.setText(f"Step {step.step} of {step.total}{eta}")
            if step.preview is not None:
                self.show_preview(qimage_from_rgb(step.preview))

    def show_preview(self, image: QImage) -> None:
        self.preview_label.setPixmap(scaled_pixmap(image, PREVIEW_SIZE))

    def _on_finished(self, result: GenerationResult) -> None:
        self.last_result = result
        if result.images:
            self.show_preview(QImage(result.images[0]))
        total = result.timings.get("total", 0.0)
        self.status_label.setText(
            f"{len(result.images)} image(s) in {total:.2f} s · {result.model_name} {result.precision} on "
            f"{result.provider} · seed {result.seeds[0]}"
        )
        self.imagesGenerated.emit(list(result.images))


def _optional_spin(minimum: int, maximum: int, step: int) -> QSpinBox:
    """A spin box whose minimum (0) reads "model default" and means None."""
    spin = QSpinBox()
    spin.setRange(minimum, maximum)
    spin.setSingleStep(step)
    spin.setSpecialValueText(DEFAULT)
    return spin
