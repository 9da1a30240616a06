"""Device profiling pieces without a device: target parsing, the runner's imports, report maths,
saving/loading/comparing profiles, df parsing."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from snapgen_app.devices import runner
from snapgen_app.devices.report import (
    ComponentProfile,
    LatencyStats,
    ProfileResult,
    compare_profiles,
    format_report,
    load_profile,
    save_profile,
)
from snapgen_app.devices.transport import DeviceInfo, parse_df_available, parse_target
from snapgen_app.errors import DeviceError, UsageError


def test_targets_parse_and_bad_ones_say_the_forms() -> None:
    assert parse_target("adb:R58M123ABC").text == "adb:R58M123ABC"
    spec = parse_target("ssh:pi@raspberrypi.local:2222")
    assert (spec.kind, spec.user, spec.address, spec.port) == ("ssh", "pi", "raspberrypi.local", 2222)
    assert parse_target("adb:192.168.1.20:5555").address == "192.168.1.20:5555"
    for bad in ("cuda", "ssh:nohost", "adb:", "ssh:u@h:99999", "ftp:x"):
        with pytest.raises(UsageError, match=r"adb:SERIAL|out of range"):
            parse_target(bad)


def test_runner_imports_only_stdlib_numpy_onnxruntime() -> None:
    tree = ast.parse(Path(runner.__file__).read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    assert modules <= {
        "__future__",
        "contextlib",
        "json",
        "os",
        "platform",
        "sys",
        "time",
        "typing",
        "resource",
        "numpy",
        "onnxruntime",
    }


def test_latency_stats_use_nearest_rank() -> None:
    stats = LatencyStats.from_samples([0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert stats is not None
    assert (stats.min_s, stats.p50_s, stats.p90_s, stats.max_s) == (0.1, 0.6, 1.0, 1.0)
    assert stats.mean_s == pytest.approx(0.55)
    assert LatencyStats.from_samples([]) is None


def _result(unet_s: float, partial: bool = False) -> ProfileResult:
    def comp(name: str, seconds: float) -> ComponentProfile:
        return ComponentProfile(
            name=name,
            role=name,
            file=f"{name}.onnx",
            latency=LatencyStats.from_samples([seconds] * 3),
            first_run_s=seconds * 2,
        )

    return ProfileResult(
        target="ssh:pi@board", device=DeviceInfo("ssh:pi@board", "ssh", "reachable", model="Raspberry Pi 5"),
        model_name="tiny", bundle_hash="ab" * 32, precision="int8", provider="cpu", threads=4, runs=3, steps=4,
        guidance_scale=1.0, width=512, height=512,
        components=(comp("text_encoder", 0.01), comp("unet", unet_s), comp("decoder", 0.2)), partial=partial,
    )  # fmt: skip


def test_estimate_save_load_compare(tmp_path: Path) -> None:
    a, b = _result(0.5), _result(0.25)
    assert a.estimated_seconds() == pytest.approx(
        {"text_encoder": 0.01, "unet": 0.5, "decoder": 0.2, "unet_total": 2.0, "total": 2.21}
    )
    eight = a.estimated_seconds(8)
    assert eight is not None and eight["total"] == pytest.approx(4.21)
    path = save_profile(a, tmp_path)
    assert json.loads(path.read_text())["estimate"]["total"] == pytest.approx(2.21)
    assert load_profile(path) == a
    rows = {r.name: r for r in compare_profiles(a, b)}
    assert rows["unet"].ratio == pytest.approx(0.5)
    assert rows["total (4 steps)"].ratio == pytest.approx((0.01 + 1.0 + 0.2) / 2.21)
    assert "estimated end-to-end for 4 steps: 2210.000 ms" in format_report(a)
    raw = json.loads(path.read_text())
    raw["surprise"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(DeviceError, match="unknown key"):
        load_profile(path)
    path.write_text(json.dumps(raw), encoding="utf-16")  # re-saved by a Windows editor
    with pytest.raises(DeviceError, match="cannot read profile"):
        load_profile(path)


def test_partial_report_is_labelled() -> None:
    result = dataclasses.replace(_result(0.5, partial=True), errors=("unet: connection lost",))
    assert "PARTIAL RESULT: unet: connection lost" in format_report(result)


def test_df_parsing() -> None:
    gnu = "Filesystem     1K-blocks    Used Available Use% Mounted on\n/dev/sda1 1000 10 990 1% /\n"
    assert parse_df_available(gnu) == 990 * 1024
    wrapped = "Filesystem 1K-blocks Used Available Use% Mounted on\n/dev/mapper/very-long-name\n 1000 10 4242 1% /\n"
    assert parse_df_available(wrapped) == 4242 * 1024
    with pytest.raises(DeviceError, match="free space"):
        parse_df_available("df: /nope: No such file or directory")
