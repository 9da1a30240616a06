"""The SSH transport end to end against a real OpenSSH sshd on 127.0.0.1 (Debian openssh-server).

The test starts its own sshd on a free port with host and user keys made in tmp; the "device" is
this machine, its Python this venv's, its work folder a tmp folder. It runs the real runner on a
tiny bundle: profiling (report, saved JSON, reuse of pushed files, partial results on a timeout,
clear errors for a missing Python / provider) and generating an image whose PNG carries the
device's timings and whose pixels equal a local generation with the same seed.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paramiko")
from test_runtime_fixtures import build_bundle

from snapgen_app import service as app_service
from snapgen_app.api import GenerationRequest
from snapgen_app.cli import main as cli_main
from snapgen_app.devices import service as devices
from snapgen_app.devices.report import format_comparison, format_report, load_profile
from snapgen_app.errors import DeviceError
from snapgen_app.pipeline.png import read_png_metadata, read_png_text

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Sshd:
    target: str
    key: Path
    workdir: Path

    def options(self, **changes: object) -> devices.ConnectOptions:
        values: dict[str, object] = {
            "ssh_key": str(self.key),
            "remote_python": sys.executable,
            "remote_dir": str(self.workdir),
        }
        values.update(changes)
        return devices.ConnectOptions(**values)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not Path(SSHD).is_file() or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server not installed (apt-get install -y openssh-server)")
    folder = tmp_path_factory.mktemp("sshd")
    _keygen(folder / "host_key")
    _keygen(folder / "user_key")
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {folder / 'host_key'}",
                f"PidFile {folder / 'sshd.pid'}",
                f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                "StrictModes no",
                "UsePAM no",
                "PermitRootLogin yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    log = open(folder / "sshd.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    ready = False
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                ready = sock.recv(4).startswith(b"SSH-")
                break
        except OSError:
            time.sleep(0.1)
    if not ready:
        process.kill()
        process.wait()
        log.close()
        pytest.skip(f"sshd could not start: {(folder / 'sshd.log').read_text()[-400:]}")
    workdir = folder / "device"
    try:
        yield Sshd(f"ssh:{getpass.getuser()}@127.0.0.1:{port}", folder / "user_key", workdir)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "tiny", precisions=("fp32",), guidance_scale=2.0)


def test_profile_over_ssh_runs_the_real_runner(sshd: Sshd, bundle: Path) -> None:
    events: list[str] = []
    request = devices.ProfileRequest(
        model=str(bundle), target=sshd.target, runs=5, threads=1, connect=sshd.options()
    )
    result = devices.profile(request, on_event=lambda e: events.append(e.kind))
    assert not result.partial, result.errors
    assert [c.role for c in result.components] == ["text_encoder", "unet", "decoder"]
    unet = result.component("unet")
    assert unet is not None and unet.latency is not None
    assert unet.latency.count == 5 and 0 < unet.latency.p50_s <= unet.latency.max_s
    assert unet.session_create_s is not None and unet.first_run_s is not None
    assert unet.provider_used == "CPUExecutionProvider"
    assert unet.input_shapes["sample"] == [2, 16, 4, 4]  # guidance 2.0 -> CFG batch of 2; 32 px / 8
    assert unet.peak_rss_bytes and unet.peak_rss_bytes > 10 * 2**20
    assert {op.op_type for op in unet.top_ops} >= {"Conv"}
    assert abs(sum(op.share for op in unet.top_ops) - 1.0) < 1e-6
    assert not list(sshd.workdir.rglob("ort_profile_*")), "the op-profile traces are removed on the device"
    estimate = result.estimated_seconds()
    assert estimate is not None
    assert estimate["total"] == pytest.approx(
        estimate["text_encoder"] + 4 * estimate["unet"] + estimate["decoder"]
    )
    assert result.device.state == "reachable" and result.device.cpu_cores and result.device.ram_bytes
    assert events[0] == "started" and events[-1] == "finished"
    saved = load_profile(result.runtime["saved_to"])
    assert saved.bundle_hash == result.bundle_hash and saved.precision == "fp32" and saved.provider == "cpu"
    assert saved.component("unet") == unet
    text = format_report(result)
    assert "estimated end-to-end for 4 steps" in text and "unet" in text
    print("\n" + text)  # the sample report pasted into docs/devices.md

    # Second run: the models are on the device already and are reused, not pushed again.
    logs: list[str] = []
    again = devices.profile(
        devices.ProfileRequest(
            model=str(bundle),
            target=sshd.target,
            runs=3,
            op_profile_runs=0,
            components=("unet",),
            connect=sshd.options(),
        ),
        on_event=lambda e: logs.append(e.message),
    )
    assert not any(m.startswith("pushing") for m in logs), logs
    assert any("reused on the device" in m for m in logs)
    assert "x" in format_comparison(saved, again)


def test_perf_test_over_ssh_finds_the_pushed_models_in_a_relative_work_folder(
    sshd: Sshd, bundle: Path, tmp_path: Path
) -> None:
    """The default work folder over SSH is relative to the login's home ("snapgen-device"); the
    perf_test command runs inside it, so the model paths it gets must be relative to it too. A
    stand-in perf_test fails unless the model file it is given exists where it runs."""
    from test_devices_adb import PERF_TEST_OUTPUT

    fake = tmp_path / "perf_test"
    fake.write_text(
        "#!/bin/sh\n"
        'for last; do :; done\n[ -f "$last" ] || { echo "File doesn\'t exist: $last" >&2; exit 1; }\n'
        f"cat <<'EOF'\n{PERF_TEST_OUTPUT}EOF\n"
    )
    fake.chmod(0o755)
    relative = f"snapgen-test-{os.getpid()}"
    try:
        result = devices.profile(
            devices.ProfileRequest(
                model=str(bundle),
                target=sshd.target,
                perf_test=str(fake),
                components=("unet",),
                connect=sshd.options(remote_dir=relative),
                save=False,
            )
        )
    finally:
        shutil.rmtree(Path.home() / relative, ignore_errors=True)
    assert not result.partial, result.errors
    unet = result.component("unet")
    assert unet is not None and unet.source == "perf_test" and unet.latency is not None


def test_generate_over_ssh_matches_local_pixels(sshd: Sshd, bundle: Path, tmp_path: Path) -> None:
    request = GenerationRequest(
        prompt="a red apple", model=str(bundle), seed=7, output_paths=(str(tmp_path / "remote.png"),)
    )
    remote = devices.generate_on_device(request, sshd.target, connect=sshd.options())
    local = app_service.generate(
        request.replace(output_paths=(str(tmp_path / "local.png"),), precision="fp32")
    )
    from PIL import Image

    with Image.open(remote.images[0]) as a, Image.open(local.images[0]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # same seed, same provider: same pixels
    text = read_png_text(remote.images[0])
    timings = json.loads(text["device_timings"])
    assert set(timings["timings"]) >= {"text_encoder", "unet", "unet_per_step", "decoder", "total"}
    assert len(timings["step_times_s"]) == 4
    assert text["device"].startswith(sshd.target)
    assert read_png_metadata(remote.images[0]).seed == 7
    assert remote.timings["device_unet"] > 0 and "@ ssh:" in remote.provider


def test_cli_add_profile_and_generate_with_device(
    sshd: Sshd, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        [
            "devices",
            "add",
            sshd.target,
            "--ssh-key",
            str(sshd.key),
            "--remote-python",
            sys.executable,
            "--remote-dir",
            str(sshd.workdir),
        ]
    )
    assert code == 0
    assert "saved ssh:" in capsys.readouterr().out
    assert cli_main(["devices", "forget", "ssh:nobody@192.0.2.1", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"target": "ssh:nobody@192.0.2.1", "forgotten": False}
    # --adb pointing nowhere: listing skips adb instead of starting a real adb server here
    assert cli_main(["devices", "list", "--json", "--adb", "adb-not-installed-here"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(d["target"] == sshd.target and d["state"] == "saved" for d in listed["devices"])
    assert (
        cli_main(
            [
                "devices",
                "profile",
                str(bundle),
                "--target",
                sshd.target,
                "--runs",
                "2",
                "--op-profile-runs",
                "0",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["estimate"]["total"] > 0 and not report["partial"]
    out = tmp_path / "cli.png"
    assert (
        cli_main(
            [
                "generate",
                "a dog",
                "--model",
                str(bundle),
                "--seed",
                "3",
                "-o",
                str(out),
                "--device",
                sshd.target,
            ]
        )
        == 0
    )
    assert "device_timings" in read_png_text(out)
    assert cli_main(["devices", "profile", str(bundle), "--target", sshd.target, "--ep", "qnn"]) == 1
    assert "QNNExecutionProvider" in capsys.readouterr().err
    # a size the model cannot run is refused before anything is pushed (bad usage: 2); a profile
    # that did not finish (here: its timeout) prints what it measured and exits 1 with the cause
    profile = ["devices", "profile", str(bundle), "--target", sshd.target, "--no-save"]
    assert cli_main([*profile, "--width", "40"]) == 2
    assert "40x32 is not a multiple of" in capsys.readouterr().err
    assert cli_main([*profile, "--steps", "-4"]) == 2
    capsys.readouterr()
    assert cli_main([*profile, "--runs", "100000", "--timeout", "3", "--op-profile-runs", "0"]) == 1
    captured = capsys.readouterr()
    assert "PARTIAL RESULT" in captured.out and "the profile is incomplete" in captured.err


def test_timeout_keeps_partial_results(sshd: Sshd, bundle: Path) -> None:
    """A thermal run longer than the timeout: the runner stops at its deadline, the result is partial."""
    request = devices.ProfileRequest(
        model=str(bundle),
        target=sshd.target,
        runs=100000,
        timeout_s=3,
        op_profile_runs=0,
        components=("unet",),
        connect=sshd.options(),
        save=False,
    )
    result = devices.profile(request)
    unet = result.component("unet")
    assert result.partial and unet is not None and unet.partial
    assert unet.latency is not None and 0 < unet.latency.count < 100000
    assert "deadline" in unet.error


def test_a_timed_out_or_cancelled_command_is_stopped_on_the_device(sshd: Sshd) -> None:
    """Closing an SSH channel without a terminal signals nothing: the command would run on (a
    profiling runner holding the board's CPU and memory). A timeout and a cancel both stop it."""
    from snapgen_app.devices.ssh import SshTransport
    from snapgen_app.devices.transport import parse_target
    from snapgen_app.errors import Cancelled

    transport = SshTransport(parse_target(sshd.target), key_path=str(sshd.key), workdir=str(sshd.workdir))
    marker = f"{os.getpid()}.{time.monotonic_ns() % 1000}"

    def still_running(seconds: str) -> bool:
        return subprocess.run(["pgrep", "-f", f"sleep {seconds}"], capture_output=True).returncode == 0

    try:
        with pytest.raises(DeviceError, match="did not finish within 1 s"):
            transport.run(f"sleep 3{marker}", timeout=1)
        deadline = time.monotonic() + 5
        while still_running(f"3{marker}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not still_running(f"3{marker}")

        calls = {"n": 0}

        def cancel_soon() -> bool:
            calls["n"] += 1
            return calls["n"] > 20

        with pytest.raises(Cancelled):
            transport.run(f"cd / && sleep 4{marker}", timeout=60, cancel=cancel_soon)
        deadline = time.monotonic() + 5
        while still_running(f"4{marker}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not still_running(f"4{marker}")
        result = transport.run("echo out; echo err >&2", timeout=10)
        assert (result.stdout, result.stderr) == ("out\n", "err\n")  # the process id line is not output
        from snapgen_app.devices.ssh import _split_pid  # a login shell may print before the marker

        assert _split_pid(b"Welcome to the board\n@@snapgen-pid 4242\noops\n") == (
            4242,
            "Welcome to the board\noops\n",
        )
    finally:
        transport.close()


def test_a_cancel_stops_a_push_within_a_block(sshd: Sshd, tmp_path: Path) -> None:
    """Cancel while a large model file is being copied: it stops there (not after the whole file)."""
    from snapgen_app.devices.ssh import SshTransport
    from snapgen_app.devices.transport import parse_target
    from snapgen_app.errors import Cancelled

    big = tmp_path / "unet.int8.onnx"
    big.write_bytes(os.urandom(8 * 2**20))
    transport = SshTransport(parse_target(sshd.target), key_path=str(sshd.key), workdir=str(sshd.workdir))
    asked = {"n": 0}

    def cancel_after_a_few_blocks() -> bool:
        asked["n"] += 1
        return asked["n"] > 3

    remote = sshd.workdir / "pushed.onnx"
    transport.ensure_dir(str(sshd.workdir))
    try:
        with pytest.raises(Cancelled):
            transport.push(str(big), str(remote), cancel=cancel_after_a_few_blocks)
    finally:
        transport.close()
    assert asked["n"] == 4
    assert not remote.exists() or remote.stat().st_size < big.stat().st_size


def test_missing_python_and_modules_say_what_to_install(sshd: Sshd, bundle: Path, tmp_path: Path) -> None:
    request = devices.ProfileRequest(
        model=str(bundle), target=sshd.target, connect=sshd.options(remote_python="/nonexistent/python3")
    )
    with pytest.raises(DeviceError, match="Python") as info:
        devices.profile(request)
    assert "apt install python3" in str(info.value)
    bare = tmp_path / "bare-python"  # a Python without numpy/onnxruntime: the system one, isolated
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    bare.chmod(0o755)
    request = devices.ProfileRequest(
        model=str(bundle), target=sshd.target, connect=sshd.options(remote_python=str(bare))
    )
    with pytest.raises(DeviceError, match="lacks") as info:
        devices.profile(request)
    assert "pip install onnxruntime numpy" in str(info.value)


def test_unreachable_and_refused_logins_are_clear(sshd: Sshd, bundle: Path, tmp_path: Path) -> None:
    closed = _free_port()
    with pytest.raises(DeviceError, match="cannot connect over SSH"):
        devices.describe_target(
            f"ssh:root@127.0.0.1:{closed}", devices.ConnectOptions(ssh_key=str(sshd.key), connect_timeout=3)
        )
    other = tmp_path / "other_key"
    _keygen(other)
    with pytest.raises(DeviceError, match="login refused"):
        devices.describe_target(sshd.target, devices.ConnectOptions(ssh_key=str(other)))
