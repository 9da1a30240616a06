"""bundle.json: strict parsing, atomic writing, verification, pickle refusal, header checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_server import fake_onnx_bytes, make_bundle, safetensors_bytes

from model_store.bundle import (
    FORMAT_VERSION,
    check_onnx_file,
    check_safetensors_header,
    hash_file,
    installed_precisions,
    migrate_manifest,
    read_manifest,
    verify_bundle,
    verify_or_raise,
    write_manifest,
)
from model_store.errors import IntegrityError, ManifestError, StoreCancelled, UnsafeFileError


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    written = make_bundle(tmp_path / "b")
    read = read_manifest(tmp_path / "b")
    assert read == written
    assert read.format_version == FORMAT_VERSION
    assert set(read.files) == {
        "tokenizer.json",
        "text_encoder.onnx",
        "unet.fp32.onnx",
        "unet.int8.onnx",
        "decoder.fp32.onnx",
        "decoder.int8.onnx",
    }
    assert read.files["unet.int8.onnx"].sha256 == hash_file(tmp_path / "b" / "unet.int8.onnx")
    assert read.variant("int8").unet == "unet.int8.onnx"
    assert read.variant_files("int8") == (
        "text_encoder.onnx",
        "unet.int8.onnx",
        "decoder.int8.onnx",
        "tokenizer.json",
    )
    assert read.precisions == ("fp32", "int8")
    assert read.model.null_condition == "empty_prompt"
    with pytest.raises(ManifestError, match=r"no 'fp16' variant; available: \['fp32', 'int8'\]"):
        read.variant("fp16")
    # no temp file left behind by the atomic write
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]


def test_null_condition_is_optional_and_round_trips(tmp_path: Path) -> None:
    """Bundles written before the field existed read as ``empty_prompt``; ``zeros`` survives a write."""
    make_bundle(tmp_path / "b")
    _edit_manifest(tmp_path / "b", lambda r: r["model"].pop("null_condition"))
    assert read_manifest(tmp_path / "b").model.null_condition == "empty_prompt"
    _edit_manifest(tmp_path / "b", lambda r: r["model"].update(null_condition="zeros"))
    assert read_manifest(tmp_path / "b").model.null_condition == "zeros"
    assert read_manifest(tmp_path / "b").to_dict()["model"]["null_condition"] == "zeros"


def test_verify_reports_each_status(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    make_bundle(folder)
    assert all(c.ok for c in verify_bundle(folder))
    (folder / "unet.int8.onnx").write_bytes(fake_onnx_bytes(99))  # same size, other bytes
    (folder / "decoder.fp32.onnx").unlink()
    (folder / "notes.txt").write_text("hi")
    status = {c.path: c.status for c in verify_bundle(folder)}
    assert status["unet.int8.onnx"] == "mismatch"
    assert status["decoder.fp32.onnx"] == "missing"
    assert status["notes.txt"] == "unexpected"
    assert status["tokenizer.json"] == "ok"
    with pytest.raises(IntegrityError) as info:
        verify_or_raise(folder)
    assert set(info.value.files) == {"unet.int8.onnx", "decoder.fp32.onnx"}
    assert "unet.int8.onnx: mismatch (sha256" in str(info.value)


def test_verify_only_installed_precisions(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    manifest = make_bundle(folder)
    (folder / "unet.fp32.onnx").unlink()
    (folder / "decoder.fp32.onnx").unlink()
    assert installed_precisions(folder, manifest) == ("int8",)
    checks = verify_bundle(folder, precisions=["int8"])
    assert [c.path for c in checks] == sorted(manifest.files_for(["int8"]))
    assert all(c.ok for c in checks)
    verify_or_raise(folder, precisions=["int8"])
    with pytest.raises(IntegrityError):
        verify_or_raise(folder)


def test_verify_progress_and_cancel(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    manifest = make_bundle(folder)
    seen: list[tuple[int, int, str]] = []
    verify_bundle(folder, progress=lambda d, t, n: seen.append((d, t, n)))
    assert seen[-1][0] == seen[-1][1] == manifest.total_size
    with pytest.raises(StoreCancelled):
        verify_bundle(folder, cancel=lambda: True)


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "bundle.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda r: r["defaults"].update(seed=1), r"unknown key\(s\) \['seed'\] in defaults"),
        (lambda r: r.update(format_version=99), "newer than this SnapGen Studio"),
        (lambda r: r.pop("format_version"), "format_version must be a positive integer"),
        (lambda r: r["variants"].update(int4=r["variants"]["int8"]), r"unknown precision\(s\) \['int4'\]"),
        (lambda r: r["files"].pop("unet.int8.onnx"), "not listed in files"),
        (
            lambda r: r["files"].update({"../evil.onnx": r["files"]["unet.int8.onnx"]}),
            "not a plain relative path",
        ),
        (lambda r: r["defaults"].update(steps=True), "defaults.steps must be an integer"),
        (lambda r: r["files"]["unet.int8.onnx"].update(sha256="XYZ"), "64 lowercase hex"),
        (lambda r: r["model"].update(null_condition="noise"), "model.null_condition must be one of"),
    ],
)
def test_manifest_rejects_bad_fields(tmp_path: Path, edit, message: str) -> None:
    folder = tmp_path / "b"
    make_bundle(folder)
    _edit_manifest(folder, edit)
    with pytest.raises((ManifestError, UnsafeFileError), match=message):
        read_manifest(folder)


def test_missing_or_broken_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path)
    (tmp_path / "bundle.json").write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError):
        migrate_manifest([])  # type: ignore[arg-type]


def test_pickles_refused_and_named(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    make_bundle(folder)
    (folder / "sub").mkdir()
    (folder / "sub" / "model.ckpt").write_bytes(b"x")
    (folder / "weights.PT").write_bytes(b"x")
    with pytest.raises(UnsafeFileError, match=r"\['sub/model.ckpt', 'weights.PT'\]") as info:
        verify_or_raise(folder)
    assert info.value.files == ("sub/model.ckpt", "weights.PT")
    with pytest.raises(UnsafeFileError, match="pickle"):
        make_bundle(folder)  # write_manifest refuses too


def test_safetensors_header_checks(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(safetensors_bytes())
    assert check_safetensors_header(good)["w"]["shape"] == [8]
    data = safetensors_bytes()
    for name, payload, message in [
        ("short", data[:5], "8-byte header length"),
        ("header", data[:20], "header says"),
        ("body", data[:-4], "truncated"),
        ("json", b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{", "not JSON"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(payload)
        with pytest.raises(IntegrityError, match=message):
            check_safetensors_header(path)


def test_onnx_plausibility(tmp_path: Path) -> None:
    good = tmp_path / "m.onnx"
    good.write_bytes(fake_onnx_bytes(0))
    assert check_onnx_file(good) == 8
    for payload, message in [
        (b"", "empty"),
        (b"<html>", "does not start like an ONNX model"),
        (b"version https://git-lfs", "does not start like"),
        (b"\x08\x00", "implausible"),
    ]:
        good.write_bytes(payload)
        with pytest.raises(IntegrityError, match=message):
            check_onnx_file(good)


def test_write_manifest_refuses_truncated_onnx(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    manifest = make_bundle(folder)
    (folder / "unet.int8.onnx").write_bytes(b"")
    with pytest.raises(IntegrityError, match="empty"):
        write_manifest(folder, manifest)


def test_external_data_follows_its_variant(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    make_bundle(folder)
    (folder / "unet.fp32.onnx.data").write_bytes(b"weights")
    manifest = write_manifest(folder, read_manifest(folder))
    assert "unet.fp32.onnx.data" in manifest.variant_files("fp32")
    assert "unet.fp32.onnx.data" not in manifest.files_for(["int8"])
    assert "unet.fp32.onnx.data" in manifest.files_for(["fp32"])
    (folder / "unet.fp32.onnx.data").unlink()
    assert installed_precisions(folder, manifest) == ("int8",)
