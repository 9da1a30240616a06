"""adb transport: Android phones over USB or Wi-Fi debugging, through the ``adb`` program.

Only command lines that real adb (platform-tools >= 28) accepts are used::

    adb devices -l
    adb -s SERIAL push LOCAL REMOTE
    adb -s SERIAL pull REMOTE LOCAL
    adb -s SERIAL shell CMD                      (CMD is one argument; the device's sh parses it)
    adb -s SERIAL shell getprop ro.product.model

``adb shell`` returns the remote exit status on Android 7+ (shell protocol v2). A device whose state
is ``unauthorized`` or ``offline`` raises DeviceError saying what to do; so does a device that
disappears in the middle of a run (adb then says "device 'X' not found" or "closed").

Note for testers: ``adb shell`` runs as the ``shell`` user, which cannot start Termux's Python (it
lives in Termux's private app folder). Over adb use ``onnxruntime_perf_test`` (``--perf-test``) or a
Python placed where the shell user can run it (``--remote-python``); for the Python runner on a
phone, Termux's sshd with the SSH transport is the usual route (docs/devices.md).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from snapgen_app.devices.transport import CancelCheck, CommandResult, DeviceInfo, Transport
from snapgen_app.errors import Cancelled, DeviceError

log = logging.getLogger(__name__)

DEFAULT_WORKDIR = "/data/local/tmp/snapgen"
POLL_S = 0.05
STATE_HINTS: dict[str, str] = {
    "unauthorized": "unlock the phone and accept the 'Allow USB debugging?' prompt (tick 'Always allow'), "
    "then run `snapgen devices list` again",
    "offline": "unplug and replug the cable, or run `adb kill-server`; on Wi-Fi debugging pair again",
    "no permissions": "on Linux add a udev rule for the phone (Debian package android-sdk-platform-tools-common)",
    "recovery": "reboot the phone into Android",
    "sideload": "reboot the phone into Android",
    "bootloader": "reboot the phone into Android",
}
#: adb's own words for a device that went away (the remote command's stderr also comes through
#: ``adb shell``, so "not found" alone would mistake a missing program for a lost phone).
_LOST_RE = re.compile(
    r"device '[^']*' not found|device offline|error: closed|no devices/emulators found|protocol fault"
)


def adb_program(adb: str | None = None) -> str:
    """Path of the adb executable (``adb`` on PATH by default); DeviceError saying how to install it."""
    name = adb or "adb"
    found = shutil.which(name)
    if found is None:
        raise DeviceError(
            f"the adb program was not found ({name!r} is not on PATH)",
            hint="install it: Debian/Ubuntu `apt install adb`, macOS `brew install android-platform-tools`, "
            "Windows: Android SDK platform-tools",
        )
    return found


def _run_adb(
    args: Sequence[str], timeout: float, cancel: CancelCheck | None = None
) -> tuple[int, str, str, float]:
    """Run adb with ``args``; (returncode, stdout, stderr, seconds). Timeout/cancel kill only it."""
    started = time.monotonic()
    with subprocess.Popen(
        list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    ) as process:
        while True:
            try:
                out, err = process.communicate(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel():
                    process.kill()
                    process.communicate()
                    raise Cancelled("cancelled by the user") from None
                if time.monotonic() - started > timeout:
                    process.kill()
                    process.communicate()
                    raise DeviceError(
                        f"`{' '.join(args[1:])[:100]}` did not finish within {timeout:.0f} s",
                        hint="raise --timeout, or use fewer --runs; partial results are kept",
                    ) from None
    return (
        process.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        time.monotonic() - started,
    )


def parse_devices(text: str) -> list[DeviceInfo]:
    """Devices from ``adb devices -l`` output (state and the ``model:``/``device:`` fields)."""
    devices = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")) or line.startswith("adb server"):
            continue
        # "SERIAL  STATE key:value ..."; the state "no permissions" has a space in it
        serial, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.startswith("no permissions"):
            state, fields = "no permissions", []
        else:
            words = rest.split()
            state, fields = (words[0] if words else "unknown"), words[1:]
        props = dict(f.split(":", 1) for f in fields if ":" in f)
        devices.append(
            DeviceInfo(
                target=f"adb:{serial}",
                kind="adb",
                state=state,
                model=props.get("model", "").replace("_", " "),
                extra={k: v for k, v in props.items() if k in ("product", "device", "usb", "transport_id")},
            )
        )
    return devices


def list_adb_devices(adb: str | None = None, timeout: float = 20.0) -> list[DeviceInfo]:
    """Every device adb sees, in any state. Raises DeviceError when adb is missing or fails."""
    program = adb_program(adb)
    code, out, err, _ = _run_adb([program, "devices", "-l"], timeout)
    if code != 0:
        raise DeviceError(
            f"`adb devices -l` failed: {(err or out).strip()[:200]}", hint="run `adb kill-server` and retry"
        )
    return parse_devices(out)


class AdbTransport(Transport):
    """One Android device through adb; ``serial`` as shown by ``adb devices``."""

    kind = "adb"

    def __init__(self, serial: str, *, adb: str | None = None, workdir: str = DEFAULT_WORKDIR) -> None:
        self.serial = serial
        self.target = f"adb:{serial}"
        self.workdir = workdir
        self.program = adb_program(adb)

    def check_ready(self) -> None:
        """Raise DeviceError unless the device is listed in state ``device`` (says what to do)."""
        devices = list_adb_devices(self.program)
        match = next((d for d in devices if d.target == self.target), None)
        if match is None:
            listed = [f"{d.target} ({d.state})" for d in devices] or ["none"]
            raise DeviceError(
                f"no adb device {self.serial!r} is connected (adb sees: {', '.join(listed)})",
                hint="plug the phone in with USB debugging on (Settings > Developer options), then `snapgen devices list`",
            )
        if match.state != "device":
            raise DeviceError(
                f"adb device {self.serial} is {match.state}",
                hint=STATE_HINTS.get(match.state, "reconnect the device and check `adb devices`"),
            )

    def _adb(
        self, args: Sequence[str], timeout: float, cancel: CancelCheck | None = None
    ) -> tuple[int, str, str, float]:
        code, out, err, seconds = _run_adb([self.program, "-s", self.serial, *args], timeout, cancel)
        text = (err + out).lower()
        if code != 0 and _LOST_RE.search(text):
            state = "offline" if "offline" in text else "disconnected"
            raise DeviceError(
                f"adb device {self.serial} {'went offline' if state == 'offline' else 'disconnected'} "
                f"during `adb {args[0]}`: {(err or out).strip()[:200]}",
                hint="reconnect it and run again (finished parts are kept); check the cable and that the phone stays awake",
            )
        if code != 0 and "unauthorized" in text:
            raise DeviceError(f"adb device {self.serial} is unauthorized", hint=STATE_HINTS["unauthorized"])
        return code, out, err, seconds

    def push(
        self, local: str, remote: str, timeout: float = 600.0, cancel: CancelCheck | None = None
    ) -> None:
        code, out, err, _ = self._adb(["push", local, remote], timeout, cancel)
        if code != 0:
            detail = (err or out).strip()
            hint = (
                "free space on the phone or pick another --remote-dir" if "space" in detail.lower() else None
            )
            raise DeviceError(f"adb push {Path(local).name} -> {remote} failed: {detail[:300]}", hint=hint)

    def pull(self, remote: str, local: str, timeout: float = 600.0) -> None:
        code, out, err, _ = self._adb(["pull", remote, local], timeout)
        if code != 0:
            raise DeviceError(f"adb pull {remote} failed: {(err or out).strip()[:300]}")

    def run(self, command: str, timeout: float = 60.0, cancel: CancelCheck | None = None) -> CommandResult:
        code, out, err, seconds = self._adb(["shell", command], timeout, cancel)
        return CommandResult(code, out, err, seconds)

    def getprop(self, name: str) -> str:
        """One Android system property (``adb -s SERIAL shell getprop NAME``), "" when unset."""
        code, out, _err, _ = self._adb(["shell", "getprop", name], 20)
        return out.strip() if code == 0 else ""

    def describe(self) -> DeviceInfo:
        self.check_ready()
        model = self.getprop("ro.product.model")
        manufacturer = self.getprop("ro.product.manufacturer")
        soc = self.getprop("ro.soc.model") or self.getprop("ro.board.platform") or self.getprop("ro.hardware")
        release = self.getprop("ro.build.version.release")
        sdk = self.getprop("ro.build.version.sdk")
        abi = self.getprop("ro.product.cpu.abi")
        meminfo = self.run("cat /proc/meminfo", timeout=20).stdout
        mem_kib = next(
            (int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), None
        )
        cores = self.run("getconf _NPROCESSORS_ONLN 2>/dev/null || nproc", timeout=20).stdout.strip()
        return DeviceInfo(
            target=self.target,
            kind="adb",
            state="device",
            model=" ".join(p for p in (manufacturer, model) if p),
            soc=soc,
            os=f"Android {release} (API {sdk})" if release else "",
            abi=abi,
            ram_bytes=mem_kib * 1024 if mem_kib else None,
            cpu_cores=int(cores) if cores.isdigit() else None,
        )
