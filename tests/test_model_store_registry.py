"""Registry and imports: install/list/resolve/remove/repair, built-ins, locking, bad inputs."""

from __future__ import annotations

import json
import multiprocessing
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hub_server import make_bundle, make_checkpoint, safetensors_bytes

from model_store.bundle import verify_bundle
from model_store.errors import (
    IntegrityError,
    InvalidModelError,
    ModelExistsError,
    ModelNotFoundError,
    NotEnoughSpaceError,
    ProtectedModelError,
    UnsafeFileError,
)
from model_store.imports import import_model
from model_store.registry import ModelSource, Registry, name_from


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "home", builtin_dir=tmp_path / "builtin")


@pytest.fixture
def kept(registry: Registry, tmp_path: Path) -> Registry:
    """A registry that already holds the model 'keep', which no failure may harm."""
    make_bundle(tmp_path / "keep-src", name="keep")
    registry.install(tmp_path / "keep-src", "keep", source=ModelSource(type="import"))
    return registry


def assert_keep_intact(registry: Registry) -> None:
    fresh = Registry(registry.home, builtin_dir=registry.builtin_dir)  # re-read from disk
    model = fresh.resolve("keep")
    assert all(check.ok for check in verify_bundle(model.path))
    json.loads(fresh.index_path.read_text())  # the index is valid JSON
    assert not list((fresh.home / "models").glob(".*"))  # no half-installed folder


def test_install_list_resolve_remove(registry: Registry, tmp_path: Path) -> None:
    make_bundle(tmp_path / "src", name="tiny")
    model = registry.install(
        tmp_path / "src", "tiny", source=ModelSource(type="trained", request={"steps": 3})
    )
    assert model.kind == "bundle"
    assert model.variants == ("fp32", "int8")
    assert model.path == registry.home / "models" / "tiny"
    assert (tmp_path / "src" / "bundle.json").exists()  # copied, not moved
    index = json.loads(registry.index_path.read_text())
    assert index["models"]["tiny"]["path"] == "models/tiny"  # relative: the home folder may move
    assert index["models"]["tiny"]["source"] == {
        "type": "trained",
        "repo": None,
        "revision": None,
        "request": {"steps": 3},
    }
    assert [m.name for m in registry.list()] == ["tiny"]
    assert registry.resolve("tiny") == model
    assert registry.resolve(None).name == "tiny"  # the only model is the default
    assert registry.disk_usage()["total"] == model.size_bytes > 0
    with pytest.raises(ModelExistsError, match="already installed"):
        registry.install(tmp_path / "src", "tiny", source=ModelSource(type="import"))
    with pytest.raises(
        ModelNotFoundError, match=r"no model named 'nope' is installed; installed: \['tiny'\]"
    ):
        registry.resolve("nope")
    registry.remove("tiny")
    assert registry.list() == []
    assert not model.path.exists()
    with pytest.raises(ModelNotFoundError):
        registry.remove("tiny")


def test_builtin_models_are_listed_and_protected(tmp_path: Path) -> None:
    builtin = tmp_path / "builtin"
    make_bundle(builtin / "snapgen-emoji", name="snapgen-emoji")
    registry = Registry(tmp_path / "home", builtin_dir=builtin)
    make_bundle(tmp_path / "src", name="aaa")
    registry.install(tmp_path / "src", "aaa", source=ModelSource(type="import"))
    models = registry.list()
    assert [(m.name, m.source.type) for m in models] == [("snapgen-emoji", "builtin"), ("aaa", "import")]
    assert registry.default_model_name() == "snapgen-emoji"
    with pytest.raises(ProtectedModelError, match="built-in"):
        registry.remove("snapgen-emoji")
    with pytest.raises(ProtectedModelError):
        registry.install(tmp_path / "src", "snapgen-emoji", source=ModelSource(type="import"))
    assert (builtin / "snapgen-emoji" / "bundle.json").exists()


def test_repair_and_corrupt_index(kept: Registry, tmp_path: Path) -> None:
    make_bundle(kept.home / "models" / "manual", name="manual")  # copied in by hand
    make_bundle(tmp_path / "gone-src", name="gone")
    gone = kept.install(tmp_path / "gone-src", "gone", source=ModelSource(type="import"))
    import shutil

    shutil.rmtree(gone.path)  # deleted by hand
    report = kept.repair()
    assert report.added == ("manual",)
    assert report.dropped == ("gone",)
    assert report.refreshed == ("keep",)
    assert kept.names() == ["keep", "manual"]
    kept.index_path.write_text("{ not json")
    assert kept.names() == ["keep", "manual"]  # rebuilt from disk
    assert list(kept.home.glob("registry.json.corrupt-*"))
    assert_keep_intact(kept)


def _register_worker(home: str, src: str, name: str, barrier: Any, results: Any) -> None:
    registry = Registry(home, builtin_dir=Path(home) / "no-builtin")
    barrier.wait()
    try:
        registry.install(src, name, source=ModelSource(type="import"))
        results.put((name, "ok"))
    except ModelExistsError:
        results.put((name, "exists"))


def test_two_processes_register_at_once(kept: Registry, tmp_path: Path) -> None:
    sources = []
    for i in range(3):
        make_bundle(tmp_path / f"p{i}", name=f"p{i}")
        sources.append(str(tmp_path / f"p{i}"))
    names = ["p0", "p1", "p2", "p2"]  # two processes race for the same name
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(len(names)), ctx.Queue()
    procs = [
        ctx.Process(target=_register_worker, args=(str(kept.home), sources[int(n[1])], n, barrier, results))
        for n in names
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in names)
    assert outcomes == [("p0", "ok"), ("p1", "ok"), ("p2", "exists"), ("p2", "ok")]
    assert kept.names() == ["keep", "p0", "p1", "p2"]
    assert_keep_intact(kept)


# ----------------------------------------------------------------------------------------------
# imports


def test_import_folder_copy_and_link(kept: Registry, tmp_path: Path) -> None:
    make_bundle(tmp_path / "My Model", name="my model")
    copied = import_model(tmp_path / "My Model", registry=kept)
    assert copied.name == "my-model"
    assert copied.source.type == "import"
    linked = import_model(tmp_path / "My Model", name="linked", link=True, registry=kept)
    assert linked.path.is_symlink()
    kept.remove("linked")
    assert (tmp_path / "My Model" / "bundle.json").exists()  # removing a link keeps the files
    make_checkpoint(tmp_path / "ckpt")
    assert import_model(tmp_path / "ckpt", registry=kept).kind == "checkpoint"
    assert_keep_intact(kept)


def test_an_import_that_fills_the_disk_leaves_nothing_behind(
    kept: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills half way through copying a folder: one NotEnoughSpaceError (a StoreError, so
    the command line prints one line), the half copy removed from staging, nothing installed."""
    import errno
    import shutil

    make_bundle(tmp_path / "big", name="big")
    real_copy = shutil.copyfile  # what shutil.copy2, copytree's copier, writes with
    copied: list[str] = []

    def filling_disk(src: str, dst: str, **kwargs: Any) -> str:
        if copied:
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        copied.append(src)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", filling_disk)
    with pytest.raises(NotEnoughSpaceError, match=r"importing .*big failed: .*No space left on device"):
        import_model(tmp_path / "big", registry=kept)
    assert copied  # it failed after the first file, not before copying
    assert not list(kept.staging_dir.iterdir())
    assert "big" not in kept.names()
    assert_keep_intact(kept)

    monkeypatch.setattr(shutil, "copyfile", real_copy)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=10))
    with pytest.raises(NotEnoughSpaceError, match=r"needs .* bytes but .* has 10 free"):
        import_model(tmp_path / "big", registry=kept)  # refused before copying anything
    assert not list(kept.staging_dir.iterdir())


def test_import_zip_with_top_folder(kept: Registry, tmp_path: Path) -> None:
    make_bundle(tmp_path / "zipped", name="zipped")
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "zipped").iterdir()):
            zf.write(path, f"zipped/{path.name}")
    model = import_model(archive, registry=kept)
    assert model.name == "zipped"
    assert all(c.ok for c in verify_bundle(model.path))
    assert not list(kept.staging_dir.iterdir())  # staging cleaned up
    assert_keep_intact(kept)


def _zip_with(tmp_path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    make_bundle(tmp_path / "base", name="evil")
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "base").iterdir()):
            zf.write(path, path.name)
        for info, data in entries:
            zf.writestr(info, data)
    return archive


def _symlink_entry(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # S_IFLNK
    return info


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (("../escape.txt", b"x"), "outside the target folder"),
        (("sub/../../escape.txt", b"x"), "outside the target folder"),
        (("/tmp/abs-escape.txt", b"x"), "outside the target folder"),
        (("C:/windows/escape.txt", b"x"), "outside the target folder"),
        (("..\\escape.txt", b"x"), "outside the target folder"),
        ((_symlink_entry("link.onnx", "/etc/passwd"), b"/etc/passwd"), r"symlinks.*link.onnx -> /etc/passwd"),
        ((_symlink_entry("up", "../../.."), b"../../.."), "symlinks"),
        (("unet/weights.bin", b"x"), r"pickle files are refused.*unet/weights.bin"),
    ],
)
def test_import_zip_refuses_unsafe_entries(kept: Registry, tmp_path: Path, entry, message: str) -> None:
    archive = _zip_with(tmp_path, [entry])
    with pytest.raises(UnsafeFileError, match=message):
        import_model(archive, registry=kept)
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/tmp/abs-escape.txt").exists()
    assert kept.names() == ["keep"]
    assert_keep_intact(kept)


def test_import_refuses_pickles_and_names_them(kept: Registry, tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFileError, match=r"\['optimizer.pt', 'unet/diffusion_pytorch_model.bin'\]"):
        import_model(tmp_path / "ckpt", registry=kept)
    assert kept.names() == ["keep"]
    assert_keep_intact(kept)


def test_import_refuses_truncated_safetensors(kept: Registry, tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(safetensors_bytes()[:12])  # cut inside the JSON header
    with pytest.raises(IntegrityError, match="header says"):
        import_model(tmp_path / "ckpt", registry=kept)
    weights.write_bytes(safetensors_bytes()[:-8])  # cut inside the data
    with pytest.raises(IntegrityError, match="truncated"):
        import_model(tmp_path / "ckpt", registry=kept)
    assert_keep_intact(kept)


def test_import_refuses_escaping_symlink_and_bad_folders(kept: Registry, tmp_path: Path) -> None:
    make_bundle(tmp_path / "linky", name="linky")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", tmp_path / "linky" / "notes.txt")
    with pytest.raises(UnsafeFileError, match="symlinks leaving"):
        import_model(tmp_path / "linky", registry=kept)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModelError, match="neither a runtime bundle nor a diffusers checkpoint"):
        import_model(tmp_path / "empty", registry=kept)
    make_bundle(tmp_path / "altered", name="altered")
    (tmp_path / "altered" / "tokenizer.json").write_text('{"changed": 1}')
    with pytest.raises((IntegrityError, InvalidModelError)):
        import_model(tmp_path / "altered", registry=kept)
    assert kept.names() == ["keep"]
    assert_keep_intact(kept)


def test_name_from() -> None:
    assert name_from("Org/SnapGen_Tiny v2") == "snapgen_tiny-v2"
    assert name_from("/a/b/model.zip/") == "model.zip"
