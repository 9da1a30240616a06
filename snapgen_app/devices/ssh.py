"""SSH transport (paramiko): Linux boards (Raspberry Pi, Jetson) and phones running Termux's sshd.

Authentication: a key file (``key_path``), else the SSH agent and ``~/.ssh/id_*`` keys. Host keys:
like ``ssh -o StrictHostKeyChecking=accept-new``: a host seen for the first time is remembered in
``<SNAPGEN_HOME>/devices/known_hosts``; a host whose key CHANGED is refused (it may be an attack).
Files travel over SFTP; commands run through ``exec_command`` and are polled so that a timeout or
a cancel stops them within about 0.1 s.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from model_store.paths import store_home
from snapgen_app.devices.transport import CancelCheck, CommandResult, DeviceInfo, TargetSpec, Transport
from snapgen_app.errors import Cancelled, DeviceError

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
CONNECT_TIMEOUT_S = 15.0
POLL_S = 0.05


def known_hosts_path() -> Path:
    """``<SNAPGEN_HOME>/devices/known_hosts``: host keys accepted on first contact."""
    return store_home() / "devices" / "known_hosts"


_PID_MARK = "@@snapgen-pid "
STOP_TIMEOUT_S = 5.0


_PID_LINE = re.compile(rf"^{re.escape(_PID_MARK)}(\d+)\n", re.MULTILINE)


def _split_pid(err: bytes | bytearray) -> tuple[int | None, str]:
    """(the remote shell's process id from its marker line, stderr without that line); the line
    need not be the first (a login shell's start-up files may print before it)."""
    text = bytes(err).decode("utf-8", "replace")
    found = _PID_LINE.search(text)
    if found is None:
        return None, text
    return int(found.group(1)), text[: found.start()] + text[found.end() :]


class SshTransport(Transport):
    """A device reached over SSH. ``workdir`` may be absolute or relative to the login's home."""

    kind = "ssh"

    def __init__(
        self,
        spec: TargetSpec,
        *,
        key_path: str | None = None,
        workdir: str = "snapgen-device",
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        import paramiko  # imported here so that listing adb devices never needs it

        self._paramiko = paramiko
        self.spec = spec
        self.target = spec.text
        self.workdir = workdir
        self.key_path = key_path
        self.connect_timeout = connect_timeout
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> paramiko.SSHClient:
        if self._client is not None:
            return self._client
        paramiko = self._paramiko
        client = paramiko.SSHClient()
        hosts = known_hosts_path()
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.touch(exist_ok=True)
        with contextlib.suppress(OSError):
            client.load_system_host_keys()
        client.load_host_keys(str(hosts))  # new keys are saved here, never in ~/.ssh
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        port = self.spec.port or DEFAULT_PORT
        where = f"{self.spec.user}@{self.spec.address}:{port}"
        try:
            client.connect(
                self.spec.address,
                port=port,
                username=self.spec.user,
                key_filename=self.key_path,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                allow_agent=self.key_path is None,
                look_for_keys=self.key_path is None,
            )
        except paramiko.BadHostKeyException as exc:
            raise DeviceError(
                f"{where}: the host key changed since the last connection",
                hint=f"if the device was reinstalled, delete its line from {hosts}; otherwise do not connect",
            ) from exc
        except paramiko.AuthenticationException as exc:
            raise DeviceError(
                f"{where}: SSH login refused for user {self.spec.user!r}",
                hint="pass the private key with --ssh-key, and put its .pub line in the device's ~/.ssh/authorized_keys",
            ) from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise DeviceError(
                f"{where}: cannot connect over SSH: {exc}",
                hint="check that the device is on, sshd runs there (Termux: `sshd`, port 8022) and the port is right",
            ) from exc
        client.save_host_keys(str(hosts))
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)  # notice a board that drops off the network
        self._client = client
        return client

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self._connect().open_sftp()
            except (OSError, self._paramiko.SSHException, EOFError) as exc:
                raise self._lost(exc, "opening SFTP") from exc
        return self._sftp

    def _lost(self, exc: BaseException, doing: str) -> DeviceError:
        self.close()
        return DeviceError(
            f"{self.target}: connection lost while {doing}: {exc or type(exc).__name__}",
            hint="check the network / that the device is awake, then run again (finished parts are kept)",
        )

    def close(self) -> None:
        for handle in (self._sftp, self._client):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        self._sftp = None
        self._client = None

    # -- files ---------------------------------------------------------------------------------

    def push(
        self, local: str, remote: str, timeout: float = 600.0, cancel: CancelCheck | None = None
    ) -> None:
        sftp = self._sftp_client()
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(timeout)

        def check(_sent: int, _total: int) -> None:  # paramiko calls it after every block it writes
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the user")

        try:
            sftp.put(local, remote, callback=check)
        except FileNotFoundError as exc:
            raise DeviceError(f"{self.target}: cannot write {remote} (its folder does not exist)") from exc
        except OSError as exc:
            if isinstance(exc, (socket.timeout, EOFError)) or "closed" in str(exc).lower():
                raise self._lost(exc, f"pushing {Path(local).name}") from exc
            raise DeviceError(
                f"{self.target}: cannot write {remote}: {exc}", hint="check free space and permissions there"
            ) from exc
        except (self._paramiko.SSHException, EOFError) as exc:
            raise self._lost(exc, f"pushing {Path(local).name}") from exc

    def pull(self, remote: str, local: str, timeout: float = 600.0) -> None:
        sftp = self._sftp_client()
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(timeout)
        try:
            sftp.get(remote, local)
        except FileNotFoundError as exc:
            Path(local).unlink(missing_ok=True)
            raise DeviceError(f"{self.target}: {remote} does not exist on the device") from exc
        except (OSError, self._paramiko.SSHException, EOFError) as exc:
            Path(local).unlink(missing_ok=True)
            raise self._lost(exc, f"pulling {remote}") from exc

    # -- commands ------------------------------------------------------------------------------

    def run(self, command: str, timeout: float = 60.0, cancel: CancelCheck | None = None) -> CommandResult:
        client = self._connect()
        started = time.monotonic()
        try:
            channel = client.get_transport().open_session()  # type: ignore[union-attr]
            # The remote shell names its process id first: closing a channel without a terminal
            # signals nothing, so a cancel or timeout stops the command with kill (_stop_remote).
            channel.exec_command(f"echo {_PID_MARK}$$ >&2; {command}")
        except (OSError, self._paramiko.SSHException, EOFError, AttributeError) as exc:
            raise self._lost(exc, f"starting `{command[:60]}`") from exc
        out, err = bytearray(), bytearray()
        try:
            while True:
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    break
                if channel.closed and not channel.exit_status_ready():
                    raise EOFError("the channel closed before the command finished")
                elapsed = time.monotonic() - started
                if cancel is not None and cancel():
                    channel.close()
                    self._stop_remote(err)
                    raise Cancelled("cancelled by the user")
                if elapsed > timeout:
                    channel.close()
                    self._stop_remote(err)
                    raise DeviceError(
                        f"{self.target}: `{command[:80]}` did not finish within {timeout:.0f} s",
                        hint="raise --timeout, or use fewer --runs; partial results are kept",
                    )
                link = self._client.get_transport() if self._client is not None else None
                if link is None or not link.is_active():
                    raise EOFError("the SSH transport is no longer active")
                time.sleep(POLL_S)
            code = channel.recv_exit_status()
        except (OSError, self._paramiko.SSHException, EOFError) as exc:
            raise self._lost(exc, f"running `{command[:60]}`") from exc
        finally:
            channel.close()
        _, stderr = _split_pid(err)
        return CommandResult(code, out.decode("utf-8", "replace"), stderr, time.monotonic() - started)

    def _stop_remote(self, err: bytes | bytearray) -> None:
        """Best effort: SIGTERM the command's process group on the device (sshd starts each command
        in a session of its own), else its shell, so a cancelled runner does not run on."""
        pid, _ = _split_pid(err)
        if pid is None:
            return
        with contextlib.suppress(Exception):  # the link may be why it stops: nothing more to do then
            channel = self._client.get_transport().open_session()  # type: ignore[union-attr]
            channel.exec_command(f"kill -TERM -- -{pid} 2>/dev/null || kill -TERM {pid} 2>/dev/null")
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while not channel.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(POLL_S)
            channel.close()

    def describe(self) -> DeviceInfo:
        script = (
            "uname -sr; uname -m; "
            "(getprop ro.product.model 2>/dev/null || cat /sys/firmware/devicetree/base/model 2>/dev/null "
            "|| cat /sys/devices/virtual/dmi/id/product_name 2>/dev/null || hostname) | tr -d '\\000' | head -n 1; "
            "(getprop ro.soc.model 2>/dev/null; grep -m1 -E 'model name|Hardware' /proc/cpuinfo | cut -d: -f2) "
            "| sed '/^ *$/d' | head -n 1; "
            "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2; "
            "getconf _NPROCESSORS_ONLN 2>/dev/null || nproc"
        )
        result = self.run(script, timeout=30)
        lines = [line.strip() for line in result.stdout.splitlines()]
        lines += [""] * (6 - len(lines))
        mem_kib = int(lines[4]) if lines[4].isdigit() else None
        return DeviceInfo(
            target=self.target,
            kind="ssh",
            state="reachable",
            os=lines[0],
            abi=lines[1],
            model=lines[2],
            soc=lines[3],
            ram_bytes=mem_kib * 1024 if mem_kib else None,
            cpu_cores=int(lines[5]) if lines[5].isdigit() else None,
            extra={"host": self.spec.address, "user": self.spec.user},
        )
