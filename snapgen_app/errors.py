"""One exception tree for the application, with messages a person can act on.

Every error raised on purpose by ``snapgen_app`` derives from :class:`SnapGenError`. The command
line prints ``str(error)`` as a one-line cause (and the hint, when there is one) and exits with 1;
:class:`UsageError` exits with 2. Nothing here imports torch or Qt.
"""

from __future__ import annotations


class SnapGenError(Exception):
    """Base of every error the application raises on purpose.

    ``hint`` says what the person can do about it; it is printed after the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(SnapGenError):
    """The request itself is malformed (bad flag value, unknown choice)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration field is unknown, missing or inconsistent; names the field."""

    def __init__(
        self, field: str, message: str, *, allowed: object | None = None, hint: str | None = None
    ) -> None:
        text = f"{field}: {message}"
        if allowed is not None:
            text += f"; allowed: {allowed}"
        super().__init__(text, hint=hint)
        self.field = field


class ModelNotFoundError(SnapGenError):
    """No installed model answers to the requested name."""


class BundleError(SnapGenError):
    """A runtime bundle is missing, altered or malformed."""


class ProviderError(SnapGenError):
    """An execution provider was requested that this onnxruntime cannot use."""


class ExportError(SnapGenError):
    """Export to ONNX failed or drifted past its threshold."""


class TrainingError(SnapGenError):
    """A training run could not start or failed."""


class DeviceError(SnapGenError):
    """A remote device is missing, unauthorized, disconnected or lacks what the runner needs."""


class Cancelled(SnapGenError):
    """The user cancelled the operation; not a failure of the program."""

    exit_code = 130
