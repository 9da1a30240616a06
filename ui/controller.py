"""The one controller between the widgets and ``snapgen_app.service`` / ``model_store``.

Work never runs on the GUI thread: each task is a :class:`TaskWorker` (a QRunnable) on a thread pool.
Generation jobs go through a queue (one at a time, reorderable, removable); model-store tasks
(download, verify, import, remove) run on their own pool beside it.

One message type, :class:`TaskMessage`, carries every report of a task: ``started``, ``event`` (a
``snapgen_app.progress.Event``: a denoising step with its preview, download bytes, ...),
``finished`` (with the task's return value), ``error`` (a readable one-line message) and
``cancelled``. Every ``event`` report is also a cancel point (the superqt pattern): after a worker
emits it, it checks the task's CancelToken and stops there, so a cancel lands within one step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot

from model_store.errors import StoreCancelled, StoreError
from snapgen_app import service
from snapgen_app.api import GenerationRequest, GenerationResult
from snapgen_app.errors import Cancelled, SnapGenError
from snapgen_app.progress import CancelToken, Event

log = logging.getLogger(__name__)

MessageKind = Literal["started", "event", "finished", "error", "cancelled"]
TERMINAL_KINDS: tuple[str, ...] = ("finished", "error", "cancelled")
GENERATE_TASK = "generate"
#: Event kinds after which a task may still go on; terminal events from the service are followed by
#: our own terminal message, so cancel is not checked there (it would replace a real error).
_ONGOING_EVENTS = ("started", "progress", "preview", "log")

#: A task body: ``fn(report, token)`` runs on a worker thread, calls ``report(event)`` for progress
#: and returns its result. ``report`` raises Cancelled once ``token`` is cancelled.
TaskFn = Callable[[Callable[[Event], None], CancelToken], Any]


@dataclass(frozen=True)
class TaskMessage:
    """A report from a task: ``kind`` says which; ``event`` is set for ``event`` messages, ``result``
    for ``finished``, ``error`` (a message a person can act on) for ``error``."""

    kind: MessageKind
    task_id: int
    task: str
    event: Event | None = None
    result: Any = None
    error: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


@dataclass(frozen=True)
class Job:
    """A pending or running generation: its id and request."""

    job_id: int
    request: GenerationRequest

    def label(self) -> str:
        """One line for the queue list: the prompt (shortened) and the image count."""
        prompt = self.request.prompt.strip().replace("\n", " ")
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        count = f" x{self.request.num_images}" if self.request.num_images > 1 else ""
        return f"#{self.job_id} {short}{count}"


class WorkerSignals(QObject):
    """Emitted from worker threads; Qt queues delivery to receivers living on the GUI thread."""

    message = Signal(object)  # TaskMessage


def describe_error(exc: BaseException) -> str:
    """A readable one-line message for any exception a task raises."""
    if isinstance(exc, (SnapGenError, StoreError)):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller size, fewer images or int8 precision)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot access{where}: {exc.strerror} (check the disk has space and the folder is writable)"
    return f"unexpected error: {type(exc).__name__}: {exc} (see the log; please report it)"


class TaskWorker(QRunnable):
    """Runs one task body on a pool thread and reports through ``signals``."""

    def __init__(
        self,
        task_id: int,
        task: str,
        fn: TaskFn,
        token: CancelToken,
        signals: WorkerSignals,
        cancel_on_report: bool = True,
    ) -> None:
        super().__init__()
        self._cancel_on_report = cancel_on_report
        self.task_id = task_id
        self.task = task
        self._fn = fn
        self._token = token
        self._signals = signals
        self.setAutoDelete(True)

    def _send(self, kind: MessageKind, **fields: Any) -> None:
        self._signals.message.emit(TaskMessage(kind, self.task_id, self.task, **fields))

    def report(self, event: Event) -> None:
        """Forward ``event`` to the GUI, then act as a cancel point."""
        self._send("event", event=event)
        if self._cancel_on_report and event.kind in _ONGOING_EVENTS:
            self._token.raise_if_cancelled()

    def run(self) -> None:
        try:
            self._token.raise_if_cancelled()  # cancelled while it waited in the pool
            self._send("started")
            result = self._fn(self.report, self._token)
        except (Cancelled, StoreCancelled):
            self._send("cancelled")
        except Exception as exc:  # every failure becomes a message; the application keeps running
            if not isinstance(exc, (SnapGenError, StoreError)):
                log.exception("task %s #%d failed", self.task, self.task_id)
            self._send("error", error=describe_error(exc))
        else:
            self._send("finished", result=result)


class Controller(QObject):
    """Owns the generation queue and the running tasks; widgets talk to the service only through it.

    ``message`` re-emits every TaskMessage on the GUI thread. ``worker_signals.message`` is the raw
    signal emitted on worker threads (a DirectConnection there runs inside the worker, at the very
    moment of the report).
    """

    message = Signal(object)  # TaskMessage, on the GUI thread
    queueChanged = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker_signals = WorkerSignals()
        self.worker_signals.message.connect(self._on_worker_message)
        self._ids = itertools.count(1)
        self._generate_pool = QThreadPool(self)
        self._generate_pool.setMaxThreadCount(1)
        self._store_pool = QThreadPool(self)
        self._store_pool.setMaxThreadCount(2)
        self._pending: list[Job] = []
        self._current: Job | None = None
        self._tokens: dict[int, CancelToken] = {}
        self._tasks: dict[int, str] = {}

    # -- generation queue ------------------------------------------------------------------------

    @property
    def current_job(self) -> Job | None:
        return self._current

    @property
    def pending_jobs(self) -> list[Job]:
        return list(self._pending)

    @property
    def busy(self) -> bool:
        return self._current is not None

    def enqueue(self, request: GenerationRequest) -> int:
        """Queue a generation; it starts at once when nothing else runs. Returns its job id."""
        job = Job(next(self._ids), request)
        self._pending.append(job)
        self.queueChanged.emit()
        self._start_next()
        return job.job_id

    def remove_job(self, job_id: int) -> bool:
        """Drop a pending job (True) ; the running one is cancelled instead (see cancel_current)."""
        before = len(self._pending)
        self._pending = [j for j in self._pending if j.job_id != job_id]
        if len(self._pending) != before:
            self.queueChanged.emit()
            return True
        return False

    def move_job(self, job_id: int, offset: int) -> bool:
        """Move a pending job ``offset`` places (negative: earlier). False when it cannot move."""
        index = next((i for i, j in enumerate(self._pending) if j.job_id == job_id), None)
        if index is None:
            return False
        target = max(0, min(len(self._pending) - 1, index + offset))
        if target == index:
            return False
        self._pending.insert(target, self._pending.pop(index))
        self.queueChanged.emit()
        return True

    def cancel_current(self) -> bool:
        """Ask the running generation to stop at its next step; True when one was running."""
        if self._current is None:
            return False
        self._tokens[self._current.job_id].cancel()
        return True

    def cancel_job(self, job_id: int) -> bool:
        """Ask generation ``job_id`` to stop if it is the one running; False when it already ended
        (so a late second press never reaches the job that started after it)."""
        if self._current is None or self._current.job_id != job_id:
            return False
        self._tokens[job_id].cancel()
        return True

    def _start_next(self) -> None:
        if self._current is not None or not self._pending:
            return
        job = self._pending.pop(0)
        self._current = job
        self.queueChanged.emit()

        def body(report: Callable[[Event], None], token: CancelToken) -> GenerationResult:
            return service.generate(job.request, on_event=report, cancel=token)

        self._launch(job.job_id, GENERATE_TASK, body, self._generate_pool)

    # -- other tasks (model store) ------------------------------------------------------------------

    def run_task(self, task: str, fn: TaskFn, *, cancel_on_report: bool = True) -> int:
        """Run ``fn(report, token)`` on the store pool now; returns its task id for ``cancel``.

        ``cancel_on_report=False`` for bodies that hand ``token`` to code with its own cancel checks
        (downloads: raising inside the HTTP layer's write callback could be mistaken for a network
        error and retried)."""
        task_id = next(self._ids)
        self._launch(task_id, task, fn, self._store_pool, cancel_on_report)
        return task_id

    def cancel(self, task_id: int) -> bool:
        """Cancel any running task by id (the generation too); True when it was running."""
        token = self._tokens.get(task_id)
        if token is None:
            return False
        token.cancel()
        return True

    def running_tasks(self) -> dict[int, str]:
        """Task id -> task name of everything running now."""
        return dict(self._tasks)

    def _launch(
        self, task_id: int, task: str, fn: TaskFn, pool: QThreadPool, cancel_on_report: bool = True
    ) -> None:
        token = CancelToken()
        self._tokens[task_id] = token
        self._tasks[task_id] = task
        pool.start(TaskWorker(task_id, task, fn, token, self.worker_signals, cancel_on_report))

    @Slot(object)
    def _on_worker_message(self, message: TaskMessage) -> None:
        if message.is_terminal:
            self._tokens.pop(message.task_id, None)
            self._tasks.pop(message.task_id, None)
        self.message.emit(message)
        if message.is_terminal and self._current is not None and message.task_id == self._current.job_id:
            self._current = None
            self.queueChanged.emit()
            self._start_next()

    # -- shutdown -------------------------------------------------------------------------------------

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        """Drop the queue, cancel everything running and wait for the workers (True when all ended)."""
        self._pending.clear()
        for token in self._tokens.values():
            token.cancel()
        done = self._generate_pool.waitForDone(timeout_ms)
        return self._store_pool.waitForDone(timeout_ms) and done
