"""One small interface over the ways we reach a device: adb (phones) and SSH (boards, Termux).

A :class:`Transport` pushes and pulls files, runs a shell command with a timeout (and a cancel
check), and describes the device. Targets are written ``adb:SERIAL`` or
``ssh:USER@HOST[:PORT]``; :func:`parse_target` checks them. Stdlib only: the adb and SSH
implementations live in ``adb.py`` and ``ssh.py``.
"""

from __future__ import annotations

import re
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from snapgen_app.errors import DeviceError, UsageError

TransportKind = Literal["adb", "ssh"]
REMOTE_PREFIXES: tuple[str, ...] = ("adb:", "ssh:")
#: ``cancel() -> True`` stops a running remote command at its next poll (about 0.1 s).
CancelCheck = Callable[[], bool]

_SSH_RE = re.compile(
    r"^(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\])(?::(?P<port>\d{1,5}))?$"
)
_SERIAL_RE = re.compile(r"^[A-Za-z0-9._:-]+$")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed target: ``adb:SERIAL`` (``address`` = serial) or ``ssh:USER@HOST[:PORT]``."""

    kind: TransportKind
    address: str
    user: str = ""
    port: int | None = None

    @property
    def text(self) -> str:
        """The canonical ``adb:SERIAL`` / ``ssh:user@host[:port]`` spelling."""
        if self.kind == "adb":
            return f"adb:{self.address}"
        port = f":{self.port}" if self.port else ""
        return f"ssh:{self.user}@{self.address}{port}"


def is_remote_target(value: str) -> bool:
    """True for ``adb:...`` and ``ssh:...`` (the values ``--device`` hands to this package)."""
    return isinstance(value, str) and value.startswith(REMOTE_PREFIXES)


def parse_target(value: str) -> TargetSpec:
    """Parse ``adb:SERIAL`` or ``ssh:USER@HOST[:PORT]``; raises UsageError saying the allowed forms."""
    forms = "adb:SERIAL (see `snapgen devices list`) or ssh:USER@HOST[:PORT]"
    if not isinstance(value, str) or ":" not in value:
        raise UsageError(f"target {value!r} is not a device target", hint=f"use {forms}")
    kind, _, rest = value.partition(":")
    if kind == "adb" and _SERIAL_RE.match(rest):
        return TargetSpec("adb", rest)
    if kind == "ssh":
        match = _SSH_RE.match(rest)
        if match:
            port = int(match["port"]) if match["port"] else None
            if port is not None and not 1 <= port <= 65535:
                raise UsageError(f"target {value!r}: port {port} is out of range 1-65535")
            return TargetSpec("ssh", match["host"].strip("[]"), user=match["user"], port=port)
    raise UsageError(f"target {value!r} is not a device target", hint=f"use {forms}")


@dataclass(frozen=True)
class CommandResult:
    """A finished remote command: exit status, decoded output, wall seconds."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is. ``state``: "device" (ready), "unauthorized", "offline", "reachable" (SSH),
    "saved" (an SSH target not contacted now), or another adb state. Sizes in bytes; None = unknown."""

    target: str
    kind: TransportKind
    state: str
    model: str = ""
    soc: str = ""
    os: str = ""
    abi: str = ""
    ram_bytes: int | None = None
    cpu_cores: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state in ("device", "reachable")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeviceInfo:
        """Inverse of :meth:`to_dict`; unknown keys raise DeviceError naming them."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - names)
        if unknown:
            raise DeviceError(f"device description has unknown keys {unknown}; allowed: {sorted(names)}")
        return cls(**raw)

    def summary(self) -> str:
        """One line for people: target, state, model, SoC, OS, ABI, RAM."""
        parts = [self.target, self.state]
        parts += [p for p in (self.model, self.soc, self.os, self.abi) if p]
        if self.ram_bytes:
            parts.append(f"{self.ram_bytes / 2**30:.1f} GiB RAM")
        if self.cpu_cores:
            parts.append(f"{self.cpu_cores} cores")
        return "  ".join(parts)


def quote(value: str) -> str:
    """POSIX-shell quoting for remote command lines (adb shell and SSH both run sh)."""
    return shlex.quote(value)


def parse_df_available(text: str) -> int:
    """Free bytes from ``df -k PATH`` output (the last line's 4th column is available KiB).

    Works for GNU coreutils, busybox and Android toybox, which all print
    ``Filesystem 1K-blocks Used Available Use% Mounted on``. Raises DeviceError when unparseable.
    """
    lines = [line.split() for line in text.strip().splitlines() if line.strip()]
    if len(lines) >= 2:
        fields = lines[-1]
        # a long filesystem name wraps onto its own line in some df versions
        if len(lines) >= 3 and len(lines[-2]) == 1:
            fields = lines[-2] + fields
        if len(fields) >= 4 and fields[3].isdigit():
            return int(fields[3]) * 1024
    raise DeviceError(f"cannot read free space from `df -k` output: {text.strip()[:200]!r}")


class Transport(ABC):
    """Push, pull, run, describe one device. ``workdir`` is where the runner and models live there."""

    kind: TransportKind
    target: str
    workdir: str

    @abstractmethod
    def push(
        self, local: str, remote: str, timeout: float = 600.0, cancel: CancelCheck | None = None
    ) -> None:
        """Copy a local file to ``remote`` (a full remote path). Raises DeviceError; Cancelled when
        ``cancel`` returns True during the copy (the half-copied file is never claimed as present)."""

    @abstractmethod
    def pull(self, remote: str, local: str, timeout: float = 600.0) -> None:
        """Copy a remote file to ``local``. Raises DeviceError (the message names the file)."""

    @abstractmethod
    def run(self, command: str, timeout: float = 60.0, cancel: CancelCheck | None = None) -> CommandResult:
        """Run ``command`` with sh on the device. A non-zero exit is returned, not raised; a timeout,
        a lost connection or ``cancel`` raise DeviceError (Cancelled for cancel)."""

    @abstractmethod
    def describe(self) -> DeviceInfo:
        """Model, SoC, OS, ABI, RAM, cores of the device (raises DeviceError when unreachable)."""

    def close(self) -> None:  # noqa: B027 - optional hook; adb keeps no connection
        """Release the connection (SSH); nothing for adb."""

    def path(self, name: str) -> str:
        """``name`` inside the work directory."""
        return f"{self.workdir.rstrip('/')}/{name}"

    def free_bytes(self, directory: str | None = None) -> int:
        """Free bytes in ``directory`` (default: the work directory, created first)."""
        folder = directory or self.workdir
        result = self.run(f"mkdir -p {quote(folder)} && df -k {quote(folder)}", timeout=30)
        if not result.ok:
            raise DeviceError(
                f"{self.target}: cannot create or inspect {folder}: {(result.stderr or result.stdout).strip()[:200]}",
                hint="choose a writable folder with --remote-dir",
            )
        return parse_df_available(result.stdout)

    def ensure_dir(self, folder: str) -> None:
        """``mkdir -p`` on the device; DeviceError when it fails."""
        result = self.run(f"mkdir -p {quote(folder)}", timeout=30)
        if not result.ok:
            raise DeviceError(f"{self.target}: cannot create {folder}: {result.stderr.strip()[:200]}")

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
