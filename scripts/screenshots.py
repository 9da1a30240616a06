"""Take a screenshot of each page of SnapGen Studio into docs/images/ui-*.png.

Runs offscreen (QT_QPA_PLATFORM=offscreen, widget.grab()), or under Xvfb when DISPLAY is set and
``--platform xcb`` is given. Everything happens in a temporary data folder: when no model is
installed there, the tiny test bundle from tests/test_runtime_fixtures.py is built (needs the
``onnx`` package of the train extra) and a few images are generated so the gallery has content.

    .venv/bin/python scripts/screenshots.py [--out docs/images] [--platform offscreen|xcb]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (
    ("a red apple on a blue background", 11),
    ("a dog to the left of a rocket", 12),
    ("two green cats above a yellow house", 13),
    ("one small star below the moon", 14),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for ui-*.png")
    parser.add_argument(
        "--platform", default="offscreen", help="Qt platform plugin (offscreen, or xcb under Xvfb)"
    )
    parser.add_argument("--size", default="1280x820", help="window size WxH")
    return parser.parse_args(argv)


def prepare_home(home: Path) -> str:
    """Install a model into ``home`` (the tiny test bundle when none is there); returns its name."""
    from model_store.registry import ModelSource, Registry

    registry = Registry(home)
    name = registry.default_model_name()
    if name is not None:
        return name
    sys.path.insert(0, str(ROOT / "tests"))
    from test_runtime_fixtures import build_bundle  # test helper: needs onnx (train extra)

    bundle = build_bundle(home.parent / "bundle" / "tiny-demo", name="tiny-demo", precisions=("fp32", "int8"))
    registry.install(bundle, "tiny-demo", source=ModelSource(type="import", request=str(bundle)))
    return "tiny-demo"


def generate_samples(model: str, outputs: Path) -> None:
    from snapgen_app import service
    from snapgen_app.api import GenerationRequest

    for prompt, seed in PROMPTS:
        request = GenerationRequest(
            prompt=prompt,
            model=model,
            seed=seed,
            width=128,
            height=128,
            num_images=2,
            output_dir=str(outputs),
        )
        service.generate(request)


def prepare_finetune_run(work: Path, model_images: Path, model: str) -> bool:
    """A real fine-tuning run of ``model`` for the wizard's training step (needs the train extra;
    the trainer runs in a subprocess, so this GUI process stays torch-free). False when torch is
    missing or the model has no training checkpoint (the wizard then shows its first step)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    from PIL import Image

    from snapgen_app import service
    from snapgen_app.errors import SnapGenError

    # The built-in model learns a look from six of its own pictures turned into blue-tinted
    # greyscale: the wizard's comparison then shows what fine-tuning changes (150 steps, ~30 s).
    pictures = work / "my-pictures"
    pictures.mkdir()
    for index, path in enumerate(sorted(model_images.glob("*.png"))[:6]):
        grey = Image.open(path).convert("L")
        Image.merge("RGB", (grey, grey, grey.point(lambda v: min(255, int(v * 1.3) + 40)))).save(
            pictures / f"picture_{index}.png"
        )
        (pictures / f"picture_{index}.txt").write_text(service.read_png_request(path).prompt)
    request = service.finetune.FineTuneRequest(
        images_dir=str(pictures),
        base_model=model,
        name="my-style",
        steps=150,
        lora_rank=8,
        resolution=128,
        batch_size=4,
        learning_rate=1e-3,
        sample_prompts=("a red apple on a blue background",),
        sample_seeds=(0, 1),
        sample_every=50,
        sample_steps=4,
        cpu_threads=2,
    )
    try:
        handle = service.finetune.start(request)
    except SnapGenError as exc:
        print(f"no fine-tuning run for the wizard: {exc}")
        return False
    print(f"fine-tuning run: {handle.wait(600)}")
    return True


def start_local_sshd(folder: Path) -> tuple[str, Path, object] | None:
    """An OpenSSH sshd on 127.0.0.1 with keys made in ``folder`` (as tests/test_devices_ssh.py
    does), so the device page can show a real profile of this machine; None without sshd."""
    import getpass
    import socket
    import subprocess

    sys.path.insert(0, str(ROOT / "tests"))
    from test_devices_ssh import SSHD, _free_port, _keygen

    if not Path(SSHD).is_file() or shutil.which("ssh-keygen") is None:
        return None
    folder.mkdir(parents=True)
    _keygen(folder / "host_key")
    _keygen(folder / "user_key")
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    port = _free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nPubkeyAuthentication yes\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return f"ssh:{getpass.getuser()}@127.0.0.1:{port}", folder / "user_key", process
        except OSError:
            time.sleep(0.1)
    process.kill()
    return None


def wait(app, condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the window did not reach the expected state")
        app.processEvents()
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["QT_QPA_PLATFORM"] = args.platform
    work = Path(tempfile.mkdtemp(prefix="snapgen-shots-"))
    home = work / "home"
    home.mkdir()
    os.environ["SNAPGEN_HOME"] = str(home)
    os.environ.setdefault("XDG_DATA_HOME", str(work / "xdg"))
    sys.path.insert(0, str(ROOT))

    from PySide6.QtCore import QSettings

    from ui.app import build_main_window, create_application
    from ui.main_window import DEVICES, GALLERY, GENERATE, MODELS, SETTINGS, WIZARD

    model = prepare_home(home)
    generate_samples(model, home / "outputs")
    prepare_finetune_run(work, home / "outputs", model)
    from snapgen_app import service

    service.add_device_target("ssh:pi@raspberrypi.local")  # a saved board for the device list
    app = create_application([sys.argv[0]])
    window = build_main_window(QSettings(str(work / "ui.ini"), QSettings.Format.IniFormat))
    width, height = (int(v) for v in args.size.split("x"))
    window.resize(width, height)
    window.show()
    args.out.mkdir(parents=True, exist_ok=True)

    def shot(name: str, widget=None) -> None:
        app.processEvents()
        path = args.out / f"ui-{name}.png"
        (widget or window).grab().save(str(path))
        print(path)

    # generate: one real run through the controller, so progress and the preview are real
    page = window.generate_page
    page.prompt_edit.setPlainText("a red apple on a blue background")
    page.seed_mode.setCurrentText("Fixed")
    page.seed_edit.setText("11")
    page.width_spin.setValue(128)
    page.height_spin.setValue(128)
    page.steps_spin.setValue(4)  # the built-in model's default
    window.show_page(GENERATE)
    page.submit()
    wait(app, lambda: page.last_result is not None)
    window.banner.dismiss()
    shot("generate")

    window.show_page(GALLERY)
    window.gallery_page.list.setCurrentRow(0)
    shot("gallery")

    window.show_page(MODELS)
    models = window.models_page
    models.select_name(model)
    models.verify_selected()
    wait(app, lambda: models.verification.get(model, "").startswith(("ok", "FAILED", "error")))
    window.banner.dismiss()
    shot("models")

    window.show_page(WIZARD)
    train = window.wizard_page.train_step
    if window.wizard_page.state.handle is not None:
        wait(app, lambda: train.last_state in ("finished", "failed"))
    window.banner.dismiss()
    shot("wizard")
    if train.last_state == "finished":  # side by side with the base model (fast export settings)
        wizard_page = window.wizard_page
        fast = wizard_page.export_settings.__class__
        wizard_page.export_settings = fast(calib_prompts=1, calib_steps=2, exporter="torchscript")
        wizard_page.base_export_settings = fast(
            precisions=("fp32",), calib_prompts=1, calib_steps=2, exporter="torchscript"
        )
        wizard_page.wizard.next()
        compare = wizard_page.compare_step
        wait(app, lambda: compare.done or "failed" in compare.status.text(), 600)
        window.banner.dismiss()
        shot("wizard-compare")

    window.show_page(DEVICES)
    devices = window.devices_page
    wait(app, lambda: devices.device_table.rowCount() > 0)
    sshd = start_local_sshd(work / "sshd")
    if sshd is not None:  # profile this machine over SSH twice (int8, fp32) and compare
        target, key, process = sshd
        devices.target_edit.setText(target)
        devices.key_edit.setText(str(key))
        devices.python_edit.setText(sys.executable)
        devices.remote_dir_edit.setText(str(work / "device"))
        devices.add_target()
        wait(app, lambda: devices.select_target(target))
        devices.runs_spin.setValue(5)
        for precision in ("fp32", "int8"):
            devices.precision_combo.setCurrentText(precision)
            count = len(devices.results)
            devices.profile_clicked()
            wait(
                app,
                lambda count=count: len(devices.results) > count or devices.profile_button.isEnabled(),
                300,
            )
            wait(app, lambda: devices.profile_button.isEnabled(), 300)
        if len(devices.results) == 2:
            devices.compare_selected()
            shot("devices-compare")
        devices.tabs.setCurrentIndex(0)
        process.terminate()
    window.banner.dismiss()
    shot("devices")

    window.show_page(SETTINGS)
    shot("settings")

    about = window.show_about()
    shot("about", about)
    about.close()
    window.close()
    app.processEvents()
    # Free the windows and the cached ONNX Runtime sessions before the interpreter finalizes:
    # leaving them to finalization has crashed PySide6 at exit (none_dealloc) after the comparison.
    from PySide6.QtCore import QCoreApplication, QEvent

    about.deleteLater()
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    from snapgen_app import service

    service.clear_cache()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # PySide6 still crashes in interpreter finalization (bool_dealloc) after the deletions above;
    # every screenshot is written by now, so leave without finalizing.
    os._exit(code)
