"""The model store's own exception tree (it imports nothing of ours, so not ``snapgen_app.errors``).

Every error raised on purpose by ``model_store`` derives from :class:`StoreError`. ``str(error)`` is
one line: the message, then the hint in parentheses when there is one, which is what the command
line prints after ``snapgen: error:``. Callers above (``snapgen_app``) may wrap these into their
own tree; the ``hint`` attribute says what the person can do about it.
"""

from __future__ import annotations

import errno

#: errno values that mean "no room left": the disk is full or the user's quota is used up.
DISK_FULL_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


class StoreError(Exception):
    """Base of every error the model store raises on purpose; ``exit_code`` is the command line's."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class BadRequestError(StoreError):
    """What was asked for is malformed (a repo id, a model name): bad usage, exit code 2."""

    exit_code = 2


class ManifestError(StoreError):
    """``bundle.json`` is missing, not JSON, has unknown/missing keys or an unsupported format_version."""


class IntegrityError(StoreError):
    """A file is missing, has the wrong size or sha256 (bundle.json or the Hub's hash), or a corrupt header."""

    def __init__(self, message: str, *, hint: str | None = None, files: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint=hint)
        self.files = files


class UnsafeFileError(StoreError):
    """A pickle file, or a path that leaves its folder (zip-slip, absolute path, escaping symlink)."""

    def __init__(self, message: str, *, hint: str | None = None, files: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint=hint)
        self.files = files


class InvalidModelError(StoreError):
    """A folder or archive is neither a runtime bundle nor a diffusers-layout checkpoint."""


class ModelNotFoundError(StoreError):
    """No installed model answers to the requested name."""


class ModelExistsError(StoreError):
    """A model with that name is already installed."""


class ProtectedModelError(StoreError):
    """The built-in model cannot be removed or replaced."""


class RegistryError(StoreError):
    """The registry index cannot be read, written or locked."""


class DownloadError(StoreError):
    """A Hub download failed (network, server); nothing was installed."""


class OfflineError(DownloadError):
    """A download was asked for while offline mode (HF_HUB_OFFLINE) is on."""


class RepoNotFoundError(DownloadError):
    """The Hub repository does not exist or is private without a valid token."""


class RevisionNotFoundError(DownloadError):
    """The requested branch, tag or commit does not exist in the repository."""


class NotEnoughSpaceError(DownloadError):
    """The disk lacks room for the files about to be downloaded or copied."""


class StoreCancelled(StoreError):
    """The caller's cancel callable returned True; partial files are kept for a later resume."""
