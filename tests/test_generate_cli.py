"""``snapgen generate`` and ``snapgen --selftest`` on a tiny real bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_runtime_fixtures import build_bundle

from snapgen_app.cli import main
from snapgen_app.commands.generate import selftest
from snapgen_app.pipeline.png import read_png_metadata


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))


def test_generate_writes_the_png_and_prints_json(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "apple.png"
    code = main(["generate", "a red apple", "--model", str(bundle), "-o", str(out), "--seed", "5", "--steps", "3",
                 "--width", "48", "--height", "32", "--threads", "1", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    assert payload["images"] == [str(out)] and payload["seeds"] == [5]
    assert payload["request"]["steps"] == 3 and payload["provider"] == "CPUExecutionProvider"
    assert "step 3/3" in captured.err
    with Image.open(out) as image:
        assert image.size == (48, 32)
    restored = read_png_metadata(out)
    assert (restored.prompt, restored.seed, restored.steps, restored.width, restored.threads) == (
        "a red apple",
        5,
        3,
        48,
        1,
    )


def test_several_images_get_numbered_names(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "a dog", "--model", str(bundle), "-o", str(tmp_path / "dog.png"), "--num-images", "2",
                 "--seed", "9"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "dog-1.png").is_file() and (tmp_path / "dog-2.png").is_file()
    assert "(seed 9)" in out and "(seed 10)" in out


def test_output_dir_default_names(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["generate", "a dog", "--model", str(bundle), "--output-dir", str(tmp_path / "imgs"), "--seed", "4"]
    )
    assert code == 0
    names = [p.name for p in (tmp_path / "imgs").iterdir()]
    assert len(names) == 1 and names[0].endswith("-4.png")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--steps", "0"], 2, "steps: 0 is out of range; allowed: 1-50"),
        (["--width", "40"], 2, "width: 40 is not a multiple of 16"),
        (["--precision", "fp16"], 2, "has no 'fp16' variant"),
        (["-o", "out.jpg"], 2, "must end with .png"),
        (["--model", "no-such-model"], 1, "no-such-model"),
    ],
)
def test_bad_usage_gives_one_line_and_exit_code(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    argv = ["generate", "a dog", "--model", str(bundle), "--output-dir", str(tmp_path / "o"), *args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("snapgen: error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_empty_prompt_is_a_usage_error(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "  ", "--model", str(bundle)]) == 2
    assert "prompt: is empty" in capsys.readouterr().err


def test_bad_device_choice_is_rejected_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "a dog", "--device", "tpu"])
    assert info.value.code == 2


def test_help_explains_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--num-images" in text and "--precision" in text and "offline" in text


def test_selftest_passes_on_a_good_bundle(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert selftest(str(bundle)) == 0
    assert "selftest: ok" in capsys.readouterr().out


def test_selftest_fails_cleanly_on_a_blank_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from model_store.bundle import read_manifest, write_manifest

    root = build_bundle(tmp_path / "blank")
    # a decoder whose weights are all zero draws a flat grey image

    model = onnx.load(str(root / "decoder.fp32.onnx"))
    weight = next(i for i in model.graph.initializer if i.name == "w")
    weight.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(weight)), name="w"))
    onnx.save(model, str(root / "decoder.fp32.onnx"))
    write_manifest(root, read_manifest(root))
    assert selftest(str(root)) == 1
    assert "blank" in capsys.readouterr().err


def test_selftest_without_the_model_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert selftest(str(tmp_path / "nowhere" / "bundle")) == 1
    assert "selftest: FAILED" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_the_console_command_runs_in_a_subprocess(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapgen_app",
            "generate",
            "a red apple",
            "--model",
            str(bundle),
            "-o",
            str(out),
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"SNAPGEN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and str(out) in proc.stdout
