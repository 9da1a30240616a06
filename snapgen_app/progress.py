"""Progress events and cancellation shared by generation, downloads, export and training.

One message type, :class:`Event`, carries every progress / finish / error / cancel report (the
krita-ai-diffusion pattern), so the command line, the Qt worker and a training subprocess speak the
same language. Training subprocesses write events as JSON lines on stdout; :func:`encode_event` and
:func:`decode_event` are the single encoding. Every progress report is also a cancel point: callers
check :class:`CancelToken` where they emit.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from snapgen_app.errors import Cancelled, SnapGenError

EventKind = Literal["started", "progress", "preview", "log", "finished", "error", "cancelled"]
EVENT_KINDS: tuple[str, ...] = ("started", "progress", "preview", "log", "finished", "error", "cancelled")


@dataclass(frozen=True)
class Event:
    """A report from long-running work.

    ``stage`` names the work ("generate", "download", "pretrain", ...); ``step``/``total`` count
    units of it; ``data`` carries stage-specific values (loss terms, bytes, preview path...).
    """

    kind: EventKind
    stage: str
    step: int = 0
    total: int = 0
    message: str = ""
    eta_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    @property
    def fraction(self) -> float:
        """Completed fraction in [0, 1]; 0 when the total is unknown."""
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0


EventCallback = Callable[[Event], None]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def encode_event(event: Event) -> str:
    """One JSON line (no trailing newline) for ``event``; non-finite floats become null."""
    return json.dumps(_json_safe(asdict(event)), separators=(",", ":"))


def decode_event(line: str) -> Event:
    """Parse a line written by :func:`encode_event`; raises ValueError on anything else."""
    raw = json.loads(line)
    if not isinstance(raw, dict) or raw.get("kind") not in EVENT_KINDS:
        raise ValueError(f"not a progress event: {line[:80]!r}")
    known = {"kind", "stage", "step", "total", "message", "eta_s", "data", "time"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown event fields {sorted(unknown)}")
    return Event(**raw)


class CancelToken:
    """Thread-safe cancel flag; ``raise_if_cancelled`` is called at every progress report."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


class EtaEstimator:
    """Seconds remaining at the rate of the last ``window`` reports (from the start until there are
    that many). A run that was paused (a laptop asleep, a second job on the same cores) shows a
    sensible estimate again once ``window`` reports have passed, where a mean since the start
    would stay inflated for the rest of the run."""

    def __init__(self, total: int, window: int = 32, clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.total = total
        self._clock = clock
        self._seen: deque[tuple[float, int]] = deque([(clock(), 0)], maxlen=window + 1)

    def eta(self, done: int) -> float | None:
        now = self._clock()
        if done <= 0 or self.total <= 0:
            return None
        if done > self._seen[-1][1]:
            self._seen.append((now, done))
        then, done_then = self._seen[0]
        if done <= done_then:  # no progress since the window's start (a count that went back)
            return None
        return (now - then) / (done - done_then) * max(0, self.total - done)


def emit(on_event: EventCallback | None, event: Event) -> None:
    """Deliver ``event`` when there is a listener."""
    if on_event is not None:
        on_event(event)


@contextlib.contextmanager
def reporting_outcome(on_event: EventCallback | None, stage: str) -> Iterator[None]:
    """Turn a failure of the work inside into its closing event, then let it propagate.

    Cancelled -> a ``cancelled`` event; any other SnapGenError -> an ``error`` event with its
    one-line message. The error itself is re-raised so callers still see it.
    """
    try:
        yield
    except Cancelled:
        emit(on_event, Event(kind="cancelled", stage=stage, message="cancelled by the user"))
        raise
    except SnapGenError as exc:
        emit(on_event, Event(kind="error", stage=stage, message=str(exc)))
        raise
