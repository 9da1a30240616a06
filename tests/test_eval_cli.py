"""`snapgen eval` end to end: torch-free generation here, prompt set and scoring in subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("emoji")

from test_runtime_fixtures import build_bundle

from snapgen_app.cli import main
from training_tools.emoji_world.classifier import (
    ClassifierConfig,
    TrainSettings,
    save_classifier,
    train_classifier,
)
from training_tools.emoji_world.curation import curate
from training_tools.emoji_world.render import font_path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        font_path()
    except Exception as exc:  # the Debian font package is missing
        pytest.skip(f"Noto Color Emoji not installed: {exc}")
    classes = curate(8, seed=5, include=())  # the farthest-point picks (the most distinct), as calibrated
    settings = TrainSettings(
        crops_per_class=24, heldout_per_class=4, epochs=4, batch_size=64, lr=1e-2, threads=1, bf16=False
    )
    model, metrics = train_classifier(
        classes, settings, ClassifierConfig(num_classes=8, input_size=32, widths=(16, 32, 48, 64))
    )
    out = tmp_path_factory.mktemp("classifier")
    save_classifier(out, model, classes, metrics)
    return out


def test_eval_scores_a_random_model_low_and_keeps_images(
    classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = build_bundle(tmp_path / "bundle")
    kept = tmp_path / "images"
    code = main(
        [
            "eval",
            str(bundle),
            "--classifier",
            str(classifier_dir),
            "--per-category",
            "2",
            "--keep-images",
            str(kept),
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["per_category"]) == {
        "single_object",
        "two_object",
        "counting",
        "background",
        "position",
    }
    assert report["num_images"] == 10
    # A random tiny network draws no emoji: every object category must fail.
    assert report["per_category"]["single_object"] == 0.0
    assert report["overall"] < 0.5
    assert len(list(kept.glob("0*.png"))) == 10
    # Every prompt's result sits next to its image.
    assert report["results_file"] == str(kept / "results.json")
    rows = json.loads((kept / "results.json").read_text())["prompts"]
    assert [r["image"] for r in rows] == [f"{i:05d}.png" for i in range(10)]
    prompts = json.loads((kept / "prompts.json").read_text())["prompts"]
    assert [r["text"] for r in rows] == [p["text"] for p in prompts]
    assert not any(r["correct"] for r in rows if r["category"] == "single_object")
    assert all(set(r) >= {"seen_background", "seen_objects", "category"} for r in rows)


def test_print_misses_spreads_examples_over_the_categories(capsys: pytest.CaptureFixture[str]) -> None:
    from snapgen_app.commands.eval import print_misses

    def row(i: int, category: str, correct: bool) -> dict:
        return {
            "image": f"{i:05d}.png",
            "text": f"prompt {i}",
            "category": category,
            "correct": correct,
            "seen_background": None if i == 3 else "blue",
            "seen_objects": ["dog"] if i == 1 else [],
        }

    rows = [row(0, "a", False), row(1, "a", False), row(2, "a", True), row(3, "b", False)]
    print_misses(rows, 2)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 of 4 prompts missed; for example:"
    assert out[1:] == [
        '  00000.png  "prompt 0"  saw: no object; background blue',
        '  00003.png  "prompt 3"  saw: no object; background not uniform',
    ]
    print_misses(rows, 0)
    print_misses([row(2, "a", True)], 5)
    assert capsys.readouterr().out == ""


def test_eval_without_a_classifier_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = build_bundle(tmp_path / "bundle")
    assert main(["eval", str(bundle)]) == 2
    assert "no EmojiEval classifier" in capsys.readouterr().err


def test_eval_folder_scores_a_bundle_folder_at_its_own_defaults(classifier_dir: Path, tmp_path: Path) -> None:
    """What `ship` reports as the shipped row and `benchmarks/emoji_eval_table.py --folder` as a
    folder's row: the int8 variant at the folder's steps and guidance, or at those of the manifest a
    ship has not written yet."""
    import dataclasses

    from model_store.bundle import read_manifest
    from training_tools.recipes.ship import eval_folder

    bundle = build_bundle(tmp_path / "bundle", precisions=("int8",), guidance_scale=2.0)
    result = eval_folder(bundle, classifier_dir, 1, tmp_path / "images")
    assert (result["steps"], result["guidance"], result["folder"]) == (4, 2.0, str(bundle))
    # seconds are rounded to 0.1 s: a tiny bundle can read 0.0
    assert result["num_images"] == 5 and result["seconds"] >= 0.0
    assert len(list((tmp_path / "images").glob("*.png"))) == 5
    assert set(result["files_sha256"]) == set(read_manifest(bundle).variant_files("int8")) - {"MODEL_CARD.md"}
    assert result["files_sha256"]["unet.int8.onnx"] == read_manifest(bundle).files["unet.int8.onnx"].sha256
    manifest = read_manifest(bundle)
    unsaved = dataclasses.replace(
        manifest, defaults=dataclasses.replace(manifest.defaults, steps=2, guidance_scale=1.0)
    )
    result = eval_folder(bundle, classifier_dir, 1, tmp_path / "images-unsaved", unsaved)
    assert (result["steps"], result["guidance"]) == (2, 1.0)
