"""The adb transport against a stand-in ``adb`` executable put first on PATH (no phone here).

The stand-in (a small Python script written by the test) accepts only the command lines real adb
accepts (``devices -l``, ``-s SERIAL push LOCAL REMOTE``, ``-s SERIAL pull REMOTE LOCAL``,
``-s SERIAL shell CMD...``), records every call, serves a device folder (``/data/local/tmp`` maps
to a tmp folder), answers ``getprop`` from a table, and plays unauthorized / offline / vanishing
devices and a nearly full disk with adb's own error messages. Shell commands run in ``sh`` here,
so the real runner runs on a tiny bundle.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from test_runtime_fixtures import build_bundle

from snapgen_app.api import GenerationRequest
from snapgen_app.cli import main as cli_main
from snapgen_app.devices import service as devices
from snapgen_app.devices.perf_test import build_command, parse_output
from snapgen_app.errors import DeviceError
from snapgen_app.pipeline.png import read_png_text

SERIAL = "R58M123ABC"
STANDIN = r'''#!PYTHON
"""Stand-in adb: records argv, checks it against real adb's grammar, serves a device folder."""
import json, os, re, subprocess, sys

config_path = os.environ["ADB_STANDIN_CONFIG"]
config = json.load(open(config_path))
args = sys.argv[1:]
with open(config["log"], "a") as log:
    log.write(json.dumps(args) + "\n")

def fail(message, code=1):
    sys.stderr.write(message + "\n")
    sys.exit(code)

if args == ["devices", "-l"]:
    print("List of devices attached")
    for serial, dev in config["devices"].items():
        extra = " usb:1-1 product:a52q model:SM_A525F device:a52q transport_id:3" if dev["state"] == "device" else " usb:1-2 transport_id:4"
        print(f"{serial:<22}{dev['state']}{extra}")
    print()
    sys.exit(0)
if len(args) < 3 or args[0] != "-s" or args[2] not in ("push", "pull", "shell"):
    fail("adb: usage: unknown command " + " ".join(args))
serial, verb, rest = args[1], args[2], args[3:]
dev = config["devices"].get(serial)
if dev is None:
    fail(f"adb: device '{serial}' not found")
if dev["state"] == "unauthorized":
    fail("adb: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\nTry 'adb kill-server' if that seems wrong.")
if dev["state"] != "device":
    fail(f"adb: device {dev['state']}")
root = dev["root"]

def local(path):
    if not path.startswith("/data/local/tmp"):
        fail(f"adb: error: remote path {path} is outside the served folder")
    return root + path

if verb == "push":
    if len(rest) != 2:
        fail("adb: usage: push [--sync] [-z ALGORITHM] [-Z] LOCAL... REMOTE")
    data = open(rest[0], "rb").read()
    target = local(rest[1])
    if not os.path.isdir(os.path.dirname(target)):
        fail(f"adb: error: failed to copy '{rest[0]}' to '{rest[1]}': remote secure_mkdirs() failed: No such file or directory")
    open(target, "wb").write(data)
    print(f"{rest[0]}: 1 file pushed, 0 skipped. 12.3 MB/s ({len(data)} bytes in 0.001s)")
    sys.exit(0)
if verb == "pull":
    if len(rest) != 2:
        fail("adb: usage: pull [-a] [-z ALGORITHM] [-Z] REMOTE... LOCAL")
    source = local(rest[0])
    if not os.path.isfile(source):
        fail(f"adb: error: failed to stat remote object '{rest[0]}': No such file or directory")
    open(rest[1], "wb").write(open(source, "rb").read())
    print(f"{rest[0]}: 1 file pulled, 0 skipped.")
    sys.exit(0)
command = " ".join(rest)  # adb joins the words with spaces; the device's sh parses them
if not command:
    fail("adb: interactive shell is not supported by this stand-in")
if rest[0] == "getprop" and len(rest) == 2:
    print(dev["props"].get(rest[1], ""))
    sys.exit(0)
vanish = dev.get("vanish_on")
if vanish and vanish in command:
    del config["devices"][serial]
    json.dump(config, open(config_path, "w"))
    fail("error: closed")
if "df_kb" in dev:
    table = f"printf 'Filesystem 1K-blocks Used Available Use%% Mounted on\\n/dev/block/dm-5 999999 999000 {dev['df_kb']} 99%% /data\\n'"
    command = re.sub(r"df -k \S+", table, command)
command = command.replace("/data/local/tmp", root + "/data/local/tmp")
os.makedirs(root + "/data/local/tmp", exist_ok=True)
done = subprocess.run(["sh", "-c", command], cwd=root)
sys.exit(done.returncode)
'''

#: The command lines real adb accepts, as used by the transport (one regex per argv joined by \x1f).
REAL_ADB_FORMS = (
    r"devices\x1f-l",
    r"-s\x1f[A-Za-z0-9._:-]+\x1fpush\x1f/[^\x1f]+\x1f/data/local/tmp/[^\x1f]+",
    r"-s\x1f[A-Za-z0-9._:-]+\x1fpull\x1f/data/local/tmp/[^\x1f]+\x1f/[^\x1f]+",
    r"-s\x1f[A-Za-z0-9._:-]+\x1fshell\x1fgetprop\x1f[a-z0-9._]+",
    r"-s\x1f[A-Za-z0-9._:-]+\x1fshell\x1f[^\x1f]+",  # one argument: the whole command line
)


class FakeAdb:
    """The stand-in's config (devices, states, props) and its call log."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config_path = folder / "config.json"
        self.log = folder / "calls.jsonl"
        self.config: dict[str, Any] = {"log": str(self.log), "devices": {}}

    def add(self, serial: str, state: str = "device", **extra: Any) -> Path:
        root = self.folder / f"device-{serial}"
        (root / "data/local/tmp").mkdir(parents=True, exist_ok=True)
        props = {
            "ro.product.model": "SM-A525F",
            "ro.product.manufacturer": "samsung",
            "ro.soc.model": "SM7125",
            "ro.build.version.release": "14",
            "ro.build.version.sdk": "34",
            "ro.product.cpu.abi": "arm64-v8a",
        }
        self.config["devices"][serial] = {"state": state, "root": str(root), "props": props, **extra}
        self.save()
        return root

    def save(self) -> None:
        self.config_path.write_text(json.dumps(self.config))

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def adb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeAdb:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "adb"
    script.write_text(STANDIN.replace("PYTHON", sys.executable, 1))
    script.chmod(0o755)
    fake = FakeAdb(tmp_path)
    fake.save()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ADB_STANDIN_CONFIG", str(fake.config_path))
    return fake


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "tiny", precisions=("fp32",))


def _options() -> devices.ConnectOptions:
    return devices.ConnectOptions(remote_python=sys.executable)


def _assert_real_adb_lines(calls: list[list[str]]) -> None:
    assert calls
    for argv in calls:
        joined = "\x1f".join(argv)
        assert any(re.fullmatch(form, joined) for form in REAL_ADB_FORMS), argv


def test_list_shows_every_state(adb: FakeAdb, capsys: pytest.CaptureFixture[str]) -> None:
    adb.add(SERIAL)
    adb.add("emulator-5554", state="unauthorized")
    adb.add("192.168.1.20:5555", state="offline")
    found = {d.target: d for d in devices.list_devices()}
    assert found[f"adb:{SERIAL}"].state == "device" and found[f"adb:{SERIAL}"].model == "SM A525F"
    assert found["adb:emulator-5554"].state == "unauthorized"
    assert found["adb:192.168.1.20:5555"].state == "offline"
    assert cli_main(["devices", "list"]) == 0
    assert "unauthorized" in capsys.readouterr().out
    assert adb.calls() == [["devices", "-l"], ["devices", "-l"]]


def test_profile_over_adb_with_the_real_runner(adb: FakeAdb, bundle: Path) -> None:
    root = adb.add(SERIAL)
    result = devices.profile(
        devices.ProfileRequest(model=str(bundle), target=f"adb:{SERIAL}", runs=3, connect=_options())
    )
    assert not result.partial, result.errors
    assert result.device.model == "samsung SM-A525F" and result.device.soc == "SM7125"
    assert result.device.os == "Android 14 (API 34)" and result.device.abi == "arm64-v8a"
    assert [c.name for c in result.components] == ["text_encoder", "unet", "decoder"]
    assert all(c.latency is not None and c.latency.count == 3 for c in result.components)
    assert (root / "data/local/tmp/snapgen/files/unet.fp32.onnx").is_file()
    manifest = json.loads((root / "data/local/tmp/snapgen/files/manifest.json").read_text())
    assert set(manifest["files"]) >= {"runner.py", "unet.fp32.onnx", "decoder.fp32.onnx", "text_encoder.onnx"}
    calls = adb.calls()
    _assert_real_adb_lines(calls)
    assert ["-s", SERIAL, "shell", "getprop", "ro.product.model"] in calls
    pushes = [c for c in calls if c[2:3] == ["push"]]
    assert any(
        c[3] == str(bundle / "unet.fp32.onnx") and c[4] == "/data/local/tmp/snapgen/files/unet.fp32.onnx"
        for c in pushes
    )


def test_generate_over_adb_pulls_the_image(adb: FakeAdb, bundle: Path, tmp_path: Path) -> None:
    adb.add(SERIAL)
    out = tmp_path / "phone.png"
    request = GenerationRequest(prompt="a red apple", model=str(bundle), seed=5, output_paths=(str(out),))
    result = devices.generate_on_device(request, f"adb:{SERIAL}", connect=_options())
    assert result.images == (str(out),)
    text = read_png_text(out)
    assert text["device"].startswith(f"adb:{SERIAL}") and "SM-A525F" in text["device"]
    assert json.loads(text["device_timings"])["timings"]["unet"] > 0
    pulls = [c for c in adb.calls() if c[2:3] == ["pull"]]
    assert (
        len(pulls) == 1
        and pulls[0][3].startswith("/data/local/tmp/snapgen/image-")
        and pulls[0][3].endswith(".npy")
    )
    _assert_real_adb_lines(adb.calls())


@pytest.mark.parametrize(
    ("state", "expected"),
    [("unauthorized", "Allow USB debugging"), ("offline", "replug the cable")],
)
def test_unauthorized_and_offline_devices(adb: FakeAdb, bundle: Path, state: str, expected: str) -> None:
    adb.add(SERIAL, state=state)
    with pytest.raises(DeviceError, match=state) as info:
        devices.profile(devices.ProfileRequest(model=str(bundle), target=f"adb:{SERIAL}", connect=_options()))
    assert expected in str(info.value)
    assert all(c[2:3] != ["push"] for c in adb.calls())


def test_no_device_and_no_adb(adb: FakeAdb, monkeypatch: pytest.MonkeyPatch) -> None:
    adb.add(SERIAL)
    with pytest.raises(DeviceError, match="no adb device 'OTHER'") as info:
        devices.describe_target("adb:OTHER")
    assert f"adb:{SERIAL} (device)" in str(info.value)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DeviceError, match="apt install adb"):
        devices.describe_target(f"adb:{SERIAL}")
    assert devices.list_devices() == []  # listing never fails for a missing adb


def test_disconnect_mid_run_keeps_partial_results(adb: FakeAdb, bundle: Path) -> None:
    adb.add(SERIAL, vanish_on="profile request-unet.json")
    result = devices.profile(
        devices.ProfileRequest(model=str(bundle), target=f"adb:{SERIAL}", runs=2, connect=_options())
    )
    assert result.partial
    text_encoder = result.component("text_encoder")
    assert text_encoder is not None and text_encoder.latency is not None
    unet = result.component("unet")
    assert unet is not None and unet.partial and "disconnected" in unet.error
    assert any("not measured: decoder" in e for e in result.errors)
    assert result.estimated_seconds() is None


def test_not_enough_storage_stops_before_pushing_models(adb: FakeAdb, bundle: Path) -> None:
    adb.add(SERIAL, df_kb=1024)  # 1 MiB free: less than the 64 MiB headroom
    with pytest.raises(DeviceError, match="not enough storage") as info:
        devices.profile(devices.ProfileRequest(model=str(bundle), target=f"adb:{SERIAL}", connect=_options()))
    assert "1.0 MiB free" in str(info.value)
    assert not any(c[2:3] == ["push"] for c in adb.calls())


def test_missing_python_over_adb_says_what_to_do(adb: FakeAdb, bundle: Path) -> None:
    adb.add(SERIAL)
    request = devices.ProfileRequest(
        model=str(bundle),
        target=f"adb:{SERIAL}",
        connect=devices.ConnectOptions(remote_python="python3-not-there"),
    )
    with pytest.raises(DeviceError, match="Python") as info:
        devices.profile(request)
    assert "Termux's sshd" in str(info.value)


PERF_TEST_OUTPUT = """Setting intra_op_num_threads to 2
Session creation time cost: 0.0171 s
First inference time cost: 3 ms
Total inference time cost: 0.0123 s
Total inference requests: 10
Average inference time cost: 1.23 ms
Total inference run time: 0.0125 s
Number of inferences per second: 800.2
Avg CPU usage: 50 %
Peak working set size: 35020800 bytes
Min Latency: 0.0011 s
Max Latency: 0.0015 s
P50 Latency: 0.0012 s
P90 Latency: 0.0014 s
P95 Latency: 0.0015 s
P99 Latency: 0.0015 s
P999 Latency: 0.0015 s
"""


def test_perf_test_command_and_output(adb: FakeAdb, bundle: Path) -> None:
    """onnxruntime_perf_test's output format (its performance_runner.cc) parsed into a component; a
    stand-in perf_test on the device checks the flags it gets."""
    assert build_command("/data/local/tmp/perf", "m.onnx", ep="xnnpack", runs=5, threads=4, free_dims={"B": 1}) == [
        "/data/local/tmp/perf", "-e", "xnnpack", "-m", "times", "-r", "5", "-I", "-s", "-x", "4", "-f", "B:1", "m.onnx",
    ]  # fmt: skip
    parsed = parse_output(PERF_TEST_OUTPUT, name="unet", role="unet", file="unet.onnx", runs=10)
    assert parsed.session_create_s == pytest.approx(0.0171) and parsed.first_run_s == pytest.approx(0.003)
    assert (
        parsed.latency is not None
        and parsed.latency.p90_s == pytest.approx(0.0014)
        and parsed.latency.count == 10
    )
    assert parsed.peak_rss_bytes == 35020800
    with pytest.raises(DeviceError, match="no timings"):
        parse_output("failed to initialize.", name="unet", role="unet", file="unet.onnx", runs=10)

    root = adb.add(SERIAL)
    fake = root / "data/local/tmp/perf_test"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1" = -e ] && [ "$3" = -m ] && [ "$4" = times ] || { echo "bad flags: $*" >&2; exit 2; }\n'
        f"cat <<'EOF'\n{PERF_TEST_OUTPUT}EOF\n"
    )
    fake.chmod(0o755)
    result = devices.profile(
        devices.ProfileRequest(
            model=str(bundle),
            target=f"adb:{SERIAL}",
            perf_test="/data/local/tmp/perf_test",
            connect=_options(),
        )
    )
    assert not result.partial, result.errors
    assert all(c.source == "perf_test" and c.latency is not None for c in result.components)
    assert result.estimated_seconds() == pytest.approx(
        {"text_encoder": 0.0012, "unet": 0.0012, "decoder": 0.0012, "unet_total": 0.0048, "total": 0.0072}
    )
    assert not any("runner.py" in " ".join(c) for c in adb.calls())  # perf_test needs no Python


def test_fixed_shape_variants_skip_absent_inputs_and_refuse_a_clash_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fixed-shapes on a UNet without the optional pooled_text input fixes the inputs it has; on
    a graph exported with another fixed size it is one DeviceError, not onnxruntime's ValueError."""
    import onnx
    from onnx import TensorProto, helper

    from snapgen_app.devices.prepare import make_fixed_shape

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))

    def relu_model(path: Path, batch: int | str) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Relu", ["sample"], ["out"])],
            "g",
            [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [batch, 4, 8, 8])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4, 8, 8])],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    shapes = {"sample": [2, 4, 8, 8], "pooled_text": [2, 32]}
    fixed = onnx.load(str(make_fixed_shape(relu_model(tmp_path / "dynamic.onnx", "B"), shapes)))
    dims = [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 4, 8, 8] and [i.name for i in fixed.graph.input] == ["sample"]
    with pytest.raises(DeviceError, match=r"cannot fix static.onnx's input sample to \[2, 4, 8, 8\]"):
        make_fixed_shape(relu_model(tmp_path / "static.onnx", 1), shapes)
