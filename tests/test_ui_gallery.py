"""The gallery: images persist across restarts, reuse-settings restores every field (from the
gallery and by dropping a PNG on the window), a PNG without our metadata gives a message, delete
moves to the trash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from pytestqt.qtbot import QtBot
from ui_support import (
    PROMPT,
    TINY_MODEL,
    collect_messages,
    install_tiny,
    make_window,
    wait_for_end,
)

from snapgen_app.api import GenerationRequest
from ui.extras import read_png_request
from ui.main_window import GALLERY, GENERATE

pytest_plugins = ["ui_support"]  # fixtures: ui_home, tiny_bundle


def _generate(qtbot: QtBot, window, **fields: object) -> list[str]:
    page = window.generate_page
    page.apply_request(GenerationRequest(**{"prompt": PROMPT, "model": TINY_MODEL, **fields}))
    messages = collect_messages(window)
    job_id = page.submit()
    end = wait_for_end(qtbot, messages, job_id)
    assert end.kind == "finished", end.error
    return list(end.result.images)


def _drop(window, path: Path) -> bool:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    enter = QDragEnterEvent(
        QPoint(20, 20),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    window.dragEnterEvent(enter)
    drop = QDropEvent(
        QPointF(20, 20),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    window.dropEvent(drop)
    return enter.isAccepted()


def _comparable(request: GenerationRequest) -> dict:
    return request.replace(output_dir=None, output_paths=(), threads=None, preview=False).to_dict()


def test_reuse_settings_restores_every_field(qtbot: QtBot, ui_home: Path, tiny_bundle: Path) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    settings = dict(
        prompt="two green cats above a yellow house",
        steps=3,
        seed=4242,
        width=48,
        height=64,
        num_images=2,
        precision="int8",
        device="cpu",
        shift=2.5,
        guidance_scale=1.5,
    )
    images = _generate(qtbot, window, **settings)
    second = Path(images[1])
    stored = read_png_request(second)
    assert stored.seed == 4243 and stored.num_images == 1, "each image reproduces itself"

    # scramble every field, then reuse from the gallery
    page = window.generate_page
    page.apply_request(GenerationRequest(prompt="something else", model=TINY_MODEL, num_images=5))
    window.show_page(GALLERY)
    assert window.gallery_page.select_path(second)
    qtbot.mouseClick(window.gallery_page.reuse_button, Qt.MouseButton.LeftButton)
    assert window.current_page() == GENERATE
    restored = page.request_from_fields()
    assert _comparable(restored) == _comparable(stored)
    expected = {**settings, "model": TINY_MODEL, "seed": 4243, "num_images": 1}
    for field, value in expected.items():
        assert getattr(restored, field) == value, field
    assert window.banner.level() == "info" and "restored" in window.banner.text()

    # the restored settings reproduce the image byte for byte
    again = _generate(qtbot, window, **{k: getattr(restored, k) for k in expected})
    assert Path(again[0]).read_bytes() != b"" and np.array_equal(
        np.asarray(Image.open(again[0])), np.asarray(Image.open(second))
    )


@pytest.mark.filterwarnings("ignore:Function.*QDragEnterEvent:DeprecationWarning")
def test_drop_png_restores_settings_and_foreign_png_is_a_message(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    [ours] = _generate(qtbot, window, seed=99, steps=2)
    window.generate_page.apply_request(GenerationRequest(prompt="other", model=TINY_MODEL, seed=1))
    assert _drop(window, Path(ours))
    assert window.generate_page.seed_edit.text() == "99"
    assert window.generate_page.prompt_edit.prompt() == PROMPT

    foreign = tmp_path / "foreign.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made elsewhere")
    Image.new("RGB", (8, 8), "red").save(foreign, pnginfo=info)
    assert _drop(window, foreign)
    assert window.banner.level() == "error" and "holds no generation settings" in window.banner.text()
    assert window.generate_page.seed_edit.text() == "99", "fields unchanged"

    damaged = tmp_path / "damaged.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("snapgen", "{not json")
    Image.new("RGB", (8, 8)).save(damaged, pnginfo=info)
    _drop(window, damaged)
    assert "damaged" in window.banner.text()

    not_png = tmp_path / "fake.png"
    not_png.write_bytes(b"this is not an image")
    _drop(window, not_png)
    assert window.banner.level() == "error" and "fake.png" in window.banner.text()
    assert window.isVisible(), "the application keeps running"


def test_gallery_persists_across_restarts_and_deletes_to_trash(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path
) -> None:
    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    images = _generate(qtbot, window, seed=5, steps=1, num_images=3)
    window.close()

    reopened = make_window(qtbot, ui_home)
    gallery = reopened.gallery_page
    assert {str(p) for p in gallery.paths()} == set(images)
    assert not gallery.list.item(0).icon().isNull()

    gallery.confirm = lambda title, question: False
    gallery.select_path(images[0])
    assert gallery.delete_selected() == [] and Path(images[0]).exists(), "declined: nothing moved"

    asked: list[str] = []
    gallery.confirm = lambda title, question: asked.append(question) or True
    gallery.select_path(images[0])
    moved = gallery.delete_selected()
    assert moved == [Path(images[0])] and not Path(images[0]).exists()
    trash = Path(ui_home.parent / "xdg" / "Trash" / "files" / Path(images[0]).name)
    assert trash.is_file(), "moved to the trash, not deleted"
    assert len(gallery.paths()) == 2 and asked
    gallery.refresh()
    assert len(gallery.paths()) == 2


def test_gallery_survives_files_that_vanish_and_viewers_free_their_images(
    qtbot: QtBot, ui_home: Path, tiny_bundle: Path
) -> None:
    """A dangling link among the outputs (its image deleted elsewhere) does not stop the window
    from opening; an image deleted in a file manager leaves the gallery without an error; a closed
    viewer is deleted (not kept hidden with its full-size pixmap)."""
    import shiboken6

    install_tiny(ui_home, tiny_bundle)
    window = make_window(qtbot, ui_home)
    images = _generate(qtbot, window, seed=7, steps=1, num_images=2)
    window.close()
    outputs = Path(images[0]).parent
    (outputs / "gone.png").symlink_to(outputs / "never-written.png")

    reopened = make_window(qtbot, ui_home)
    gallery = reopened.gallery_page
    assert {str(p) for p in gallery.paths()} == set(images)

    gallery.select_path(images[0])
    gallery.view_selected()
    viewer = gallery._viewers[-1]
    assert viewer.isVisible()
    viewer.close()
    qtbot.waitUntil(lambda: not shiboken6.isValid(viewer), timeout=5_000)
    assert gallery._viewers == []

    Path(images[1]).unlink()  # deleted in a file manager while the gallery shows it
    messages: list[str] = []
    gallery.notify = lambda text, level: messages.append(f"{level}: {text}")
    gallery.confirm = lambda title, question: True
    gallery.select_path(images[1])
    assert gallery.delete_selected() == [Path(images[1])]
    assert [str(p) for p in gallery.paths()] == [images[0]] and messages == []
