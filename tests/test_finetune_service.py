"""The torch-free fine-tuning service (snapgen_app.finetune): folder checks and caption proposals,
caption files, request validation, the training interpreter, and tailing a run's events.jsonl
(complete lines only, from the start on reattach). The whole run is tested in test_ui_wizard.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from snapgen_app import service
from snapgen_app.errors import ConfigError, TrainingError, UsageError
from snapgen_app.progress import Event, encode_event

ft = service.finetune


def _folder(root: Path) -> Path:
    root.mkdir()
    Image.new("RGB", (40, 24), (200, 10, 10)).save(root / "red_apple-01.png")
    (root / "red_apple-01.txt").write_text("a red apple\n")
    Image.new("RGB", (16, 16), (10, 10, 200)).save(root / "blue_sky.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.md").write_text("ignored")
    return root


def test_folder_report_proposes_captions_and_skips_unreadable(tmp_path: Path) -> None:
    report = ft.check_images_folder(_folder(tmp_path / "pics"))
    assert [(e.name, e.caption, e.caption_source) for e in report.images] == [
        ("blue_sky.jpg", "blue sky", "filename"),
        ("red_apple-01.png", "a red apple", "txt"),
    ]
    assert (report.images[1].width, report.images[1].height) == (40, 24)
    assert [name for name, _ in report.unreadable] == ["broken.png"]
    assert report.missing_captions == {"blue_sky.jpg": "blue sky"}
    assert (
        report.summary()
        == "2 images, 1 without a caption (proposed from the file name), 1 unreadable (skipped)"
    )

    (tmp_path / "pics" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "blue_sky.jpg", "text": "sky"})
    )
    assert ft.check_images_folder(tmp_path / "pics").captions()["blue_sky.jpg"] == "sky"


def test_folders_without_images_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(UsageError, match="has no images"):
        ft.check_images_folder(tmp_path / "empty")
    with pytest.raises(UsageError, match="is not a folder"):
        ft.check_images_folder(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(UsageError, match="can be read"):
        ft.check_images_folder(tmp_path / "bad")


def test_folder_report_reads_photos_and_captions_as_people_made_them(tmp_path: Path) -> None:
    """A portrait phone photo stored sideways with an EXIF orientation tag reports its shown size;
    a caption saved by an old Windows editor (cp1252) or with a UTF-8 byte-order mark reads as
    written; two images that would share one caption file are refused up front."""
    root = tmp_path / "pics"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    Image.new("RGB", (40, 24), (0, 90, 200)).save(root / "portrait.jpg", exif=exif.tobytes())
    Image.new("RGB", (16, 16), (10, 200, 10)).save(root / "cafe.png")
    (root / "cafe.txt").write_bytes("a café at noon\n".encode("cp1252"))
    Image.new("RGB", (16, 16), (200, 200, 10)).save(root / "bom.png")
    (root / "bom.txt").write_bytes("\ufeffa sunny crème brûlée\n".encode("utf-8"))
    report = ft.check_images_folder(root)
    entries = {e.name: e for e in report.images}
    assert (entries["portrait.jpg"].width, entries["portrait.jpg"].height) == (24, 40)
    assert entries["cafe.png"].caption == "a café at noon"
    assert entries["bom.png"].caption == "a sunny crème brûlée"

    Image.new("RGB", (16, 16), (0, 0, 0)).save(root / "cafe.jpg")
    with pytest.raises(UsageError, match=r"cafe.jpg and cafe.png would share the caption file cafe.txt"):
        ft.check_images_folder(root)


def test_write_captions(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "pics")
    written = ft.write_captions(folder, {"blue_sky.jpg": "  a clear blue sky "})
    assert written == [folder / "blue_sky.txt"] and written[0].read_text() == "a clear blue sky\n"
    assert ft.check_images_folder(folder).missing_captions == {}
    with pytest.raises(ConfigError, match="empty"):
        ft.write_captions(folder, {"blue_sky.jpg": " "})
    # a caption file that cannot be written (read-only card, full disk; here a folder in its place):
    # one UsageError, and no caption written before a bad one is found
    (folder / "blue_sky.txt").unlink()
    (folder / "blue_sky.txt").mkdir()
    with pytest.raises(UsageError, match=r"could not write blue_sky.txt \(0 of 1 caption files written\)"):
        ft.write_captions(folder, {"blue_sky.jpg": "sky"})
    before = (folder / "red_apple-01.txt").read_text()
    with pytest.raises(ConfigError, match="empty"):
        ft.write_captions(folder, {"red_apple-01.png": "changed", "blue_sky.jpg": " "})
    assert (folder / "red_apple-01.txt").read_text() == before


def test_one_damaged_run_folder_does_not_hide_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs listed for reattaching: a folder whose request.json is not UTF-8, or no longer valid
    (a setting renamed between versions), is skipped; the good run is still found."""
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    good = ft.FineTuneRequest(images_dir="/x", base_model="base", name="good")
    for name, raw in (
        ("good", json.dumps(good.to_dict()).encode()),
        ("latin", '{"name": "caf\u00e9"}'.encode("latin-1")),
        ("outdated", json.dumps({**good.to_dict(), "name": "outdated", "epochs": 3}).encode()),
    ):
        folder = tmp_path / "home" / "runs" / name
        folder.mkdir(parents=True)
        (folder / "request.json").write_bytes(raw)
    assert [h.name for h in ft.list_runs()] == ["good"]
    assert ft.running_run() is not None and ft.running_run().name == "good"
    with pytest.raises(TrainingError, match=r"request\.json is unreadable"):
        ft.attach(tmp_path / "home" / "runs" / "latin")


def test_request_validation_and_round_trip() -> None:
    request = ft.FineTuneRequest(
        images_dir="/x", base_model="base", name="my-style", sample_prompts=("a", "b")
    )
    assert ft.FineTuneRequest.from_dict(request.to_dict()) == request
    assert ft.comparison_settings(request) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    with pytest.raises(ConfigError, match="name"):
        ft.FineTuneRequest(images_dir="/x", base_model="base", name="My Style")
    with pytest.raises(ConfigError, match="resolution"):
        ft.FineTuneRequest(images_dir="/x", base_model="base", name="s", resolution=100)
    with pytest.raises(ConfigError, match="unknown keys"):
        ft.FineTuneRequest.from_dict({**request.to_dict(), "epochs": 3})


def test_training_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ft.TRAINING_PYTHON_ENV, raising=False)
    assert ft.training_python() == sys.executable  # this venv has the train extra
    with pytest.raises(TrainingError, match="does not exist"):
        ft.training_python(str(tmp_path / "nope" / "python"))
    monkeypatch.setenv(ft.TRAINING_PYTHON_ENV, sys.executable)
    assert ft.training_python() == sys.executable


def test_checkpoint_layout_is_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a training checkpoint"):
        ft.inspect_checkpoint(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="lacks autoencoder, text"):
        ft.inspect_checkpoint(tmp_path)
    with pytest.raises(UsageError, match="neither a registered model"):
        ft.resolve_base("no-such-model")


def test_fine_tuning_keeps_the_base_models_timestep_shift_and_guidance(tmp_path: Path) -> None:
    for part in ("unet", "autoencoder", "text_conditioner"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text("{}")
    request = ft.FineTuneRequest(images_dir="/x", base_model="base", name="s")
    defaults = {"_snapgen_defaults": {"shift": 3.0, "guidance_scale": 4.0}}
    (tmp_path / "model_index.json").write_text(json.dumps(defaults))
    base = ft.inspect_checkpoint(tmp_path)
    assert (base.shift, base.guidance) == (3.0, 4.0)
    config = ft.build_config(request, tmp_path / "run", "/data", base)
    assert config["flow"] == {"shift": 3.0}
    assert config["sample"]["guidance_scale"] == 4.0  # samples and the exported default
    (tmp_path / "model_index.json").write_text("{}")  # not recorded: the trainer's resolution shift
    config = ft.build_config(request, tmp_path / "run", "/data", ft.inspect_checkpoint(tmp_path))
    assert config["flow"] == {"shift": 0.0} and config["sample"]["guidance_scale"] == 1.0


def test_the_built_in_checkpoint_records_its_bundles_defaults(shipped_builtins: Path) -> None:
    """The wizard fine-tunes the built-in model at the shift it was trained at (it once fell back to
    the resolution shift 0.25 for a model trained at 3) and with its guidance (1 since emoji-v7: step
    distillation baked the teacher's CFG in)."""
    from model_store.bundle import read_manifest

    folder = shipped_builtins / "snapgen-emoji"
    defaults = read_manifest(folder).defaults
    base = ft.inspect_checkpoint(folder / "checkpoint")
    assert (base.shift, base.guidance) == (defaults.shift, defaults.guidance_scale)
    assert base.shift == 3.0 and base.guidance >= 1.0


def test_run_calibration_prompts_are_the_runs_own(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    request = ft.FineTuneRequest(
        images_dir=str(tmp_path),
        base_model="base",
        name="s",
        captions={"a.png": "a zorp cat", "b.png": "a zorp dog", "c.png": "a zorp cat"},
        sample_prompts=("a zorp bird",),
    )
    assert ft.run_calibration_prompts(request, 3) == ["a zorp bird", "a zorp cat", "a zorp dog"]
    assert ft.run_calibration_prompts(request, 1) == ["a zorp bird"]
    moved = ft.FineTuneRequest(images_dir=str(tmp_path / "gone"), base_model="base", name="s")
    assert ft.run_calibration_prompts(moved, 4) == list(moved.prompts())


def test_run_handle_tails_events_and_reattaches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    run = ft.run_dir_for("tail-test")
    run.mkdir(parents=True)
    request = ft.FineTuneRequest(images_dir="/x", base_model="b", name="tail-test", steps=3)
    (run / "request.json").write_text(json.dumps(request.to_dict()))
    lines = [
        encode_event(Event(kind="started", stage="finetune", total=3)),
        encode_event(Event(kind="progress", stage="finetune", step=1, total=3, data={"loss": {"task": 0.5}})),
        "a stray line that is not an event",
    ]
    second = encode_event(
        Event(kind="progress", stage="finetune", step=2, total=3, data={"loss": {"task": 0.4}})
    )
    (run / "events.jsonl").write_text("\n".join(lines) + "\n" + second[:20])  # the last line is unfinished
    handle = ft.attach(run)
    assert [e.kind for e in handle.history] == ["started", "progress"]
    with open(run / "events.jsonl", "a") as out:
        out.write(second[20:] + "\n")
        out.write(encode_event(Event(kind="cancelled", stage="finetune", message="stopped")) + "\n")
    assert [e.step for e in handle.poll()] == [2, 0]
    assert handle.losses() == [(1, {"task": 0.5}), (2, {"task": 0.4})]
    assert not handle.alive() and handle.state() == "paused"  # stopped by SIGTERM, resumable
    (run / "cancelled").write_text("")
    assert handle.state() == "cancelled"
    assert [h.name for h in ft.list_runs()] == ["tail-test"]
    assert ft.attach(run).history[-1].kind == "cancelled", "a new handle reads from the start"
    with pytest.raises(TrainingError, match="not a fine-tuning run"):
        ft.attach(tmp_path)
