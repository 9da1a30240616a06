"""The PyInstaller folder end to end: packaging/build.py builds it, checks it is torch-free and runs the
frozen self-tests (CLI generation with the default built-in model, the GUI offscreen).

Slow (PyInstaller analysis takes minutes) but it runs in CI: `.ci/run` runs every test. It needs
PyInstaller in the test environment (the `package` extra).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime_fixtures import build_bundle

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "packaging" / "build.py"
BUILD_MINUTES = 20  # the whole build + self-tests on a busy 2-core CI machine


def test_launcher_picks_entry_point_from_executable_name() -> None:
    """The one frozen entry script dispatches on its executable's name."""
    sys.path.insert(0, str(ROOT / "packaging"))
    try:
        from launcher import entry_name
    finally:
        sys.path.remove(str(ROOT / "packaging"))
    assert entry_name("/opt/snapgen/snapgen-studio") == "gui"
    assert entry_name("C:\\SnapGen\\snapgen-studio.exe") == "gui"
    assert entry_name("/opt/snapgen/snapgen") == "cli"


def test_packaging_is_not_a_python_package() -> None:
    """packaging/__init__.py would shadow PyPI's `packaging` (which PyInstaller itself imports)."""
    assert not (ROOT / "packaging" / "__init__.py").exists()


@pytest.mark.slow
@pytest.mark.timeout(BUILD_MINUTES * 60 + 120)
def test_frozen_folder_builds_and_passes_selftests(tmp_path: Path) -> None:
    # no importorskip: without PyInstaller build.py exits 1 saying what to install, and CI must say so
    bundle = build_bundle(tmp_path / "tiny-selftest", name="tiny-selftest")
    report_path = tmp_path / "report.json"
    command = [
        sys.executable, str(BUILD_SCRIPT), "--dist", str(tmp_path / "dist"), "--work", str(tmp_path / "work"),
        "--add-model", str(bundle), "--report", str(report_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_MINUTES * 60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    report = json.loads(report_path.read_text(encoding="utf-8"))
    folder = Path(report["folder"])
    assert report["ok"] is True
    assert (folder / "snapgen").is_file() and (folder / "snapgen-studio").is_file()
    assert "tiny-selftest" in report["builtin_models"]
    # torch-free: build.py checked it; check the folder again here independently
    assert report["forbidden_found"] == []
    assert not list(folder.rglob("torch")) and not list(folder.rglob("libtorch*"))
    assert not (folder / "_internal" / "PySide6" / "Qt" / "lib" / "libQt6Quick.so.6").exists()
    # every frozen run passed, the selftest generated an image, the GUI came up offscreen
    steps = {step["name"].split(" ")[0] + " " + step["name"].split(" ")[1]: step for step in report["steps"]}
    assert all(step["returncode"] == 0 for step in report["steps"])
    assert "selftest: ok" in steps["snapgen --selftest"]["output"]
    assert "selftest: ok" in steps["snapgen-studio --selftest"]["output"]
    assert report["first_image_seconds"] is not None and report["first_image_seconds"] > 0
    assert report["size_mb"] < 400.0, report["largest"]
    print(  # shown with -s / in the CI log: the measured numbers
        f"\nfrozen folder {report['size_mb']} MB, build {report['build_seconds']} s, "
        f"first image {report['first_image_seconds']} s, GUI {report['gui_start_seconds']} s"
    )
