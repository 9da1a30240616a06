"""JSON-lines progress events on stdout (the one encoding: snapgen_app.progress.encode_event).

The trainer reports through :class:`EventWriter`: every event goes to stdout as one line (what
``snapgen train`` and the wizard read) and is appended to ``run_dir/events.jsonl`` (the run's
history, read by tests and to compare resumed curves). Only the main process writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from snapgen_app.progress import Event, EventKind, encode_event


class EventWriter:
    """Writes events as JSON lines to a stream and to a log file; silent when ``enabled`` is False."""

    def __init__(
        self, stage: str, log_path: Path | None, *, enabled: bool = True, stream: IO[str] | None = None
    ) -> None:
        self.stage = stage
        self.log_path = log_path
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout

    def emit(
        self,
        kind: EventKind,
        *,
        step: int = 0,
        total: int = 0,
        message: str = "",
        eta_s: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> Event:
        """Build, write and return one event."""
        event = Event(
            kind=kind, stage=self.stage, step=step, total=total, message=message, eta_s=eta_s, data=data or {}
        )
        if not self.enabled:
            return event
        line = encode_event(event)
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.log_path is not None:
            with open(self.log_path, "a") as handle:
                handle.write(line + "\n")
        return event
