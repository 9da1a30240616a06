"""Build the one-folder SnapGen Studio application with PyInstaller, then test the frozen folder.

    python packaging/build.py [--dist DIR] [--work DIR] [--add-model BUNDLE_DIR ...] [--report OUT.json]

Steps, each one a reason to exit 1:
1. ``pyinstaller packaging/snapgen.spec`` -> ``<dist>/snapgen/`` with the executables ``snapgen`` and
   ``snapgen-studio`` and their shared ``_internal/`` folder (``--skip-build`` reuses a folder);
2. on Linux, strips the shared libraries with binutils ``strip`` (about 45 MB less), except the
   auditwheel-patched ones in ``*.libs/`` folders (stripping breaks numpy's OpenBLAS);
3. ``--add-model`` copies extra runtime bundles into the folder's built-in models (the CI test adds
   a tiny one while the real built-in model is not in the source tree);
4. the folder is torch-free: no torch/diffusers/transformers/... package and no libtorch inside;
5. frozen self-tests in a scratch data folder, offscreen and with no PYTHON* variables (so nothing
   can come from a virtual environment): ``snapgen --version``, ``snapgen --selftest`` (generates
   with the default built-in model and checks the PNG), ``snapgen generate`` timed from launch to the
   PNG on disk (the time to the first image), ``snapgen-studio --selftest`` (the main window shows
   offscreen and closes).
It prints the folder's size, the build time and the timings, and writes them as JSON with --report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "packaging" / "snapgen.spec"
APP_NAME = "snapgen"
EXECUTABLES = ("snapgen", "snapgen-studio")
# Packages that must never be in the folder: the training world (the wizard runs it in its own Python).
FORBIDDEN_PACKAGES = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "training_tools",
)
FORBIDDEN_LIBRARY_PREFIXES = ("libtorch", "libc10", "torch_cpu", "c10.")
SIZE_TARGET_MB = 400.0
SELFTEST_PROMPT = "a red apple on a blue background"


class BuildFailed(RuntimeError):
    """A step failed; the message says which and what to look at."""


@dataclass
class Step:
    """One frozen-program run: its command line, exit code, wall time from launch to exit, output."""

    name: str
    command: list[str]
    returncode: int
    seconds: float
    output: str


@dataclass
class Report:
    """What build.py measured; written as JSON with --report."""

    folder: str
    build_seconds: float | None = None
    size_bytes: int = 0
    size_mb: float = 0.0
    models_bytes: int = 0
    largest: dict[str, float] = field(default_factory=dict)  # top-level entries of _internal, MB
    builtin_models: list[str] = field(default_factory=list)
    forbidden_found: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    first_image_seconds: float | None = None
    gui_start_seconds: float | None = None
    ok: bool = False
    error: str = ""


# -- build ---------------------------------------------------------------------------------------------


def run_pyinstaller(dist: Path, work: Path, timeout: float) -> float:
    """Run PyInstaller on the spec; returns its wall time in seconds. Raises BuildFailed."""
    try:
        import PyInstaller  # noqa: F401
    except ModuleNotFoundError as exc:
        raise BuildFailed(
            "PyInstaller is not installed in this Python: `pip install -e '.[package]'` (or `pip install pyinstaller`)"
        ) from exc
    missing = [tool for tool in ("objcopy", "objdump") if shutil.which(tool) is None]
    if sys.platform.startswith("linux") and missing:  # PyInstaller runs them on Linux
        raise BuildFailed(f"{' and '.join(missing)} not found: install binutils (`apt-get install binutils`)")
    command = [
        sys.executable, "-m", "PyInstaller", str(SPEC), "--noconfirm", "--clean", "--log-level", "WARN",
        "--distpath", str(dist), "--workpath", str(work),
    ]  # fmt: skip
    print(f"build: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, timeout=timeout, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise BuildFailed(f"PyInstaller failed with exit code {result.returncode} (its log is above)")
    print(f"build: PyInstaller finished in {seconds:.1f} s", flush=True)
    return seconds


def strip_libraries(folder: Path) -> int:
    """Strip debug symbols from the folder's ELF shared libraries (Linux); returns bytes saved.

    PyInstaller's own ``strip`` option strips every binary, which breaks auditwheel-repaired
    libraries (numpy.libs' OpenBLAS: "ELF load command address/offset not page-aligned"), so the
    ``*.libs/`` folders are left alone here. Without binutils it does nothing.
    """
    strip = shutil.which("strip")
    if not sys.platform.startswith("linux") or strip is None:
        return 0
    libraries = [
        path
        for path in (folder / "_internal").rglob("*.so*")
        if path.is_file() and not path.is_symlink() and not any(p.endswith(".libs") for p in path.parts)
    ]
    before = folder_size(folder)
    for start in range(0, len(libraries), 64):
        batch = [str(p) for p in libraries[start : start + 64]]
        subprocess.run([strip, "--strip-unneeded", *batch], check=True, capture_output=True)
    return before - folder_size(folder)


def builtin_dir(folder: Path) -> Path:
    """Where the frozen model_store looks for built-in bundles (model_store.paths.builtin_dir())."""
    return folder / "_internal" / "model_store" / "builtin"


def add_model(folder: Path, bundle: Path) -> str:
    """Copy the runtime bundle ``bundle`` into the folder's built-in models; returns its name."""
    manifest = bundle / "bundle.json"
    if not manifest.is_file():
        raise BuildFailed(f"--add-model {bundle}: no bundle.json there (give a runtime bundle folder)")
    name = json.loads(manifest.read_text(encoding="utf-8"))["name"]
    target = builtin_dir(folder) / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle, target)
    return name


# -- checks --------------------------------------------------------------------------------------------


def folder_size(path: Path) -> int:
    """Bytes of all regular files under ``path`` (symbolic links count 0: they are not copies)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            file = Path(directory) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def largest_entries(folder: Path, count: int = 12) -> dict[str, float]:
    """The biggest top-level entries of ``_internal`` in MB (what to trim when the folder grows)."""
    internal = folder / "_internal"
    sizes = {
        entry.name: (folder_size(entry) if entry.is_dir() else entry.stat().st_size) / 1e6
        for entry in internal.iterdir()
        if not entry.is_symlink()
    }
    return {name: round(mb, 1) for name, mb in sorted(sizes.items(), key=lambda kv: -kv[1])[:count]}


def forbidden_contents(folder: Path) -> list[str]:
    """Paths inside the folder that belong to the training world (must be empty)."""
    found = []
    for directory, dirs, files in os.walk(folder):
        for name in dirs:
            if name in FORBIDDEN_PACKAGES:
                found.append(str(Path(directory, name).relative_to(folder)))
        for name in files:
            if name.startswith(FORBIDDEN_LIBRARY_PREFIXES):
                found.append(str(Path(directory, name).relative_to(folder)))
    return found


def installed_builtin_models(folder: Path) -> list[str]:
    """Names of the bundles in the folder's built-in models directory."""
    root = builtin_dir(folder)
    return sorted(p.name for p in root.iterdir() if (p / "bundle.json").is_file()) if root.is_dir() else []


# -- frozen self-tests ---------------------------------------------------------------------------------


def scratch_environment(scratch: Path) -> dict[str, str]:
    """The environment of the frozen runs: a fresh data folder and settings, offscreen Qt, and no
    PYTHON* variables, so the frozen program cannot borrow anything from a Python installation; the
    built-in models are the folder's own (no SNAPGEN_BUILTIN_DIR from the caller)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    env.pop("SNAPGEN_BUILTIN_DIR", None)
    env.update(
        SNAPGEN_HOME=str(scratch / "home"),
        HOME=str(scratch),
        XDG_CONFIG_HOME=str(scratch / "config"),
        XDG_DATA_HOME=str(scratch / "data"),
        XDG_CACHE_HOME=str(scratch / "cache"),
        QT_QPA_PLATFORM="offscreen",
    )
    return env


def run_frozen(
    folder: Path, name: str, args: list[str], env: dict[str, str], cwd: Path, timeout: float
) -> Step:
    """Run one of the folder's executables; the time is from launch to exit."""
    suffix = ".exe" if sys.platform == "win32" else ""
    command = [str(folder / f"{name}{suffix}"), *args]
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - started
    step = Step(name=f"{name} {' '.join(args)}", command=command, returncode=result.returncode,
                seconds=round(seconds, 3), output=(result.stdout + result.stderr).strip())  # fmt: skip
    status = "ok" if step.returncode == 0 else f"FAILED (exit {step.returncode})"
    print(f"selftest: {step.name}: {status} in {seconds:.2f} s", flush=True)
    if step.output:
        print("    " + step.output.replace("\n", "\n    "), flush=True)
    return step


def run_selftests(folder: Path, report: Report, timeout: float) -> None:
    """The frozen checks (see the module docstring); fills report.steps and the timings."""
    with tempfile.TemporaryDirectory(prefix="snapgen-frozen-") as tmp:
        scratch = Path(tmp)
        env = scratch_environment(scratch)
        first_image = scratch / "first.png"
        runs = [
            ("snapgen", ["--version"]),
            ("snapgen", ["--selftest"]),
            ("snapgen", ["generate", SELFTEST_PROMPT, "-o", str(first_image), "--seed", "1"]),
            ("snapgen-studio", ["--selftest"]),
        ]
        for name, args in runs:
            report.steps.append(run_frozen(folder, name, args, env, scratch, timeout))
        generate, gui = report.steps[2], report.steps[3]
        if generate.returncode == 0 and first_image.is_file():
            report.first_image_seconds = generate.seconds
        if gui.returncode == 0:
            report.gui_start_seconds = gui.seconds
    failed = [s.name for s in report.steps if s.returncode != 0]
    if failed:
        raise BuildFailed(f"frozen self-test failed: {', '.join(failed)} (output above)")
    if report.first_image_seconds is None:
        raise BuildFailed("`snapgen generate` exited 0 but wrote no PNG")


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build the SnapGen Studio folder and self-test it.")
    parser.add_argument(
        "--dist", type=Path, default=ROOT / "dist", help="output parent folder (default: dist/)"
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT / "build" / "pyinstaller", help="PyInstaller work folder"
    )
    parser.add_argument("--add-model", type=Path, action="append", default=[], metavar="BUNDLE_DIR",
                        help="copy this runtime bundle into the folder's built-in models (repeatable)")  # fmt: skip
    parser.add_argument("--skip-build", action="store_true", help="test an existing <dist>/snapgen folder")
    parser.add_argument("--no-strip", action="store_true", help="keep the libraries' debug symbols")
    parser.add_argument("--report", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--build-timeout", type=float, default=1800.0, help="seconds PyInstaller may take")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds each frozen run may take")
    return parser.parse_args(argv)


def build_and_test(args: argparse.Namespace, report: Report) -> None:
    """All steps; raises BuildFailed at the first failure."""
    folder = Path(report.folder)
    if not args.skip_build:
        report.build_seconds = round(run_pyinstaller(args.dist, args.work, args.build_timeout), 1)
        if not args.no_strip:
            print(
                f"build: stripped shared libraries, {strip_libraries(folder) / 1e6:.1f} MB saved", flush=True
            )
    if not all((folder / name).exists() or (folder / f"{name}.exe").exists() for name in EXECUTABLES):
        raise BuildFailed(f"{folder} lacks one of {EXECUTABLES}: build first (without --skip-build)")
    for bundle in args.add_model:
        print(f"build: added built-in model {add_model(folder, bundle.resolve())}", flush=True)
    report.builtin_models = installed_builtin_models(folder)
    if not report.builtin_models:
        raise BuildFailed(
            "the folder has no built-in model: put a bundle under model_store/builtin/<name>/ or pass --add-model"
        )
    report.size_bytes = folder_size(folder)
    report.size_mb = round(report.size_bytes / 1e6, 1)
    report.models_bytes = folder_size(builtin_dir(folder))
    report.largest = largest_entries(folder)
    report.forbidden_found = forbidden_contents(folder)
    if report.forbidden_found:
        raise BuildFailed(f"the folder contains the training world: {report.forbidden_found[:5]}")
    run_selftests(folder, report, args.run_timeout)


def print_summary(report: Report) -> None:
    models_mb = report.models_bytes / 1e6
    print(f"folder: {report.folder}")
    print(
        f"size: {report.size_mb:.1f} MB (built-in models {models_mb:.1f} MB; target < {SIZE_TARGET_MB:.0f} MB)"
    )
    if report.size_mb >= SIZE_TARGET_MB:
        print(f"WARNING: the folder is over the {SIZE_TARGET_MB:.0f} MB target (see the largest parts below)")
    print(f"largest in _internal (MB): {report.largest}")
    print(f"built-in models: {', '.join(report.builtin_models) or 'none'}")
    if report.build_seconds is not None:
        print(f"build time: {report.build_seconds:.1f} s")
    if report.first_image_seconds is not None:
        print(f"launch to first generated image (snapgen generate): {report.first_image_seconds:.2f} s")
    if report.gui_start_seconds is not None:
        print(f"snapgen-studio --selftest, launch to exit: {report.gui_start_seconds:.2f} s")
    print("result: ok" if report.ok else f"result: FAILED: {report.error}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # PyInstaller runs from the repository root: relative folders are made absolute here, so the
    # folder it builds is the folder checked afterwards.
    args.dist, args.work = args.dist.resolve(), args.work.resolve()
    report = Report(folder=str(args.dist / APP_NAME))
    try:
        build_and_test(args, report)
        report.ok = True
    except (BuildFailed, subprocess.TimeoutExpired, subprocess.CalledProcessError, OSError) as exc:
        report.error = str(exc)
    print_summary(report)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
