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
    page.steps_spin.setValue(8)
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

    for index, name in ((WIZARD, "wizard"), (DEVICES, "devices"), (SETTINGS, "settings")):
        window.show_page(index)
        shot(name)

    about = window.show_about()
    shot("about", about)
    about.close()
    window.close()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
