"""Downloads with the real huggingface_hub client against a local fake Hub (tests/hub_server.py).

No network: HF_ENDPOINT points at 127.0.0.1. huggingface_hub's DOWNLOAD_CHUNK_SIZE (10 MB) is
lowered so that files of a few kB are written in several chunks, as real model files are; that is
what makes a connection dropped mid-file resumable with a Range request.
"""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from hub_server import FakeHub, make_bundle, make_checkpoint

from model_store.bundle import read_manifest, verify_bundle
from model_store.download import DownloadProgress, download_model, parse_repo_spec
from model_store.errors import (
    DownloadError,
    IntegrityError,
    NotEnoughSpaceError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StoreCancelled,
    StoreError,
)
from model_store.registry import ModelSource, RegisteredModel, Registry

FILE_SIZE = 40_000


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        make_bundle(tmp_path / "repo", name="tiny", size=FILE_SIZE)
        server.add_folder("org/tiny", tmp_path / "repo", tag="v1")
        yield server


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "home", builtin_dir=tmp_path / "no-builtin")
    make_bundle(tmp_path / "keep-src", name="keep")
    registry.install(tmp_path / "keep-src", "keep", source=ModelSource(type="import"))
    return registry


def assert_keep_intact(registry: Registry) -> None:
    fresh = Registry(registry.home, builtin_dir=registry.builtin_dir)
    assert all(check.ok for check in verify_bundle(fresh.resolve("keep").path))


def fetch(registry: Registry, spec: str = "org/tiny", **kwargs: Any) -> RegisteredModel:
    kwargs.setdefault("backoff_s", 0.01)
    return download_model(spec, registry=registry, **kwargs)


def test_fresh_download_int8_only(hub: FakeHub, registry: Registry) -> None:
    seen: list[DownloadProgress] = []
    model = fetch(registry, precision="int8", progress=seen.append)
    commit = hub.repos["org/tiny"].refs["main"]
    assert model.name == "tiny"
    assert model.source.type == "hub"
    assert model.source.repo == "org/tiny"
    assert model.source.revision == commit  # pinned to the commit hash
    assert model.variants == ("int8",)
    files = sorted(p.name for p in model.path.iterdir())
    assert files == [
        "bundle.json",
        "decoder.int8.onnx",
        "text_encoder.onnx",
        "tokenizer.json",
        "unet.int8.onnx",
    ]
    fetched = {p.rsplit("/", 1)[-1] for p in hub.paths_requested("GET") if "/resolve/" in p}
    assert "unet.fp32.onnx" not in fetched  # allow-list: only the chosen precision comes down
    assert all(f"/resolve/{commit}/" in p for p in hub.paths_requested("GET") if "/resolve/" in p)
    assert seen[-1].bytes_done == seen[-1].bytes_total == model.size_bytes
    assert seen[-1].files_done == seen[-1].files_total == 5
    assert all(c.ok for c in Registry(registry.home).verify("tiny"))
    assert not list(registry.staging_dir.iterdir())  # staging moved into place
    assert_keep_intact(registry)


def test_resume_after_connection_drop(hub: FakeHub, registry: Registry) -> None:
    hub.drop["unet.int8.onnx"] = [10_000, 1]  # cut once after 10 kB
    model = fetch(registry, precision="int8")
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("unet.int8.onnx")]
    assert ranges[0] is None
    assert (
        ranges[1] is not None and ranges[1].startswith("bytes=") and int(ranges[1][6:].split("-")[0]) >= 4096
    )
    assert all(c.ok for c in verify_bundle(model.path, precisions=["int8"]))


def test_network_down_mid_file_then_resume_later(hub: FakeHub, registry: Registry) -> None:
    hub.drop["unet.int8.onnx"] = [20_000, 1]
    hub.fail["unet.int8.onnx"] = 503  # ... and the network stays down
    with pytest.raises(DownloadError, match=r"failed after 3 attempts.*resumes from"):
        fetch(registry, precision="int8", max_retries=2)
    assert registry.names() == ["keep"]
    assert_keep_intact(registry)
    parts = list(registry.staging_dir.rglob("unet.int8.onnx.part"))
    assert len(parts) == 1 and parts[0].stat().st_size > 0
    kept_bytes = parts[0].stat().st_size
    hub.fail.clear()
    hub.requests.clear()
    model = fetch(registry, precision="int8")
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("unet.int8.onnx")]
    assert ranges == [f"bytes={kept_bytes}-"]
    decoder_gets = [p for p in hub.paths_requested("GET") if p.endswith("decoder.int8.onnx")]
    assert decoder_gets == []  # finished files are not fetched again
    assert all(c.ok for c in verify_bundle(model.path, precisions=["int8"]))


def test_resume_from_a_server_that_ignores_range_starts_the_file_again(
    hub: FakeHub, registry: Registry
) -> None:
    """A mirror that answers a resumed request with 200 and the whole file: huggingface_hub rewinds
    the partial file and writes it again from byte 0; the result is the file, not old bytes + file."""
    hub.drop["unet.int8.onnx"] = [20_000, 1]
    hub.fail["unet.int8.onnx"] = 503
    with pytest.raises(DownloadError):
        fetch(registry, precision="int8", max_retries=0)
    kept_bytes = next(registry.staging_dir.rglob("unet.int8.onnx.part")).stat().st_size
    assert kept_bytes > 0
    hub.fail.clear()
    hub.requests.clear()
    hub.ignore_range = True
    model = fetch(registry, precision="int8")
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("unet.int8.onnx")]
    assert ranges == [f"bytes={kept_bytes}-"]  # asked to resume, got the whole file
    assert all(c.ok for c in verify_bundle(model.path, precisions=["int8"]))


def test_hash_mismatch_rejected(hub: FakeHub, registry: Registry) -> None:
    original = hub.repos["org/tiny"].commits[hub.repos["org/tiny"].refs["main"]]["unet.int8.onnx"]
    hub.corrupt["unet.int8.onnx"] = original[:-1] + bytes([original[-1] ^ 0xFF])
    with pytest.raises(IntegrityError, match=r"unet.int8.onnx failed verification: sha256 .* != Hub's"):
        fetch(registry, precision="int8")
    assert registry.names() == ["keep"]
    assert not list(registry.staging_dir.rglob("unet.int8.onnx*"))  # the bad bytes are gone
    assert_keep_intact(registry)


def test_revision_pinning(hub: FakeHub, registry: Registry, tmp_path: Path) -> None:
    old_commit = hub.repos["org/tiny"].refs["main"]
    make_bundle(tmp_path / "repo2", name="tiny", size=FILE_SIZE + 1)  # a new version on main
    new_commit = hub.add_folder("org/tiny", tmp_path / "repo2")
    assert new_commit != old_commit
    old = fetch(registry, f"org/tiny@{old_commit}", precision="int8", name="tiny-old")
    tagged = fetch(registry, "org/tiny@v1", precision="int8", name="tiny-v1")
    latest = fetch(registry, "org/tiny", precision="int8", name="tiny-latest")
    assert old.source.revision == tagged.source.revision == old_commit
    assert tagged.source.request == {"revision": "v1", "precision": "int8"}
    assert latest.source.revision == new_commit
    assert read_manifest(old.path).files["unet.int8.onnx"].size == FILE_SIZE
    assert read_manifest(latest.path).files["unet.int8.onnx"].size == FILE_SIZE + 1


def test_offline_mode_makes_no_request(
    hub: FakeHub, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"):
        fetch(registry)
    assert hub.requests == []
    assert registry.resolve("keep")  # installed models work offline
    assert_keep_intact(registry)


def test_unknown_repo_and_revision(hub: FakeHub, registry: Registry) -> None:
    with pytest.raises(RepoNotFoundError, match="'org/nope' was not found") as info:
        fetch(registry, "org/nope")
    assert "HF_TOKEN" in str(info.value)
    assert "hf_test_token_not_real" not in str(info.value)
    with pytest.raises(RevisionNotFoundError, match="no revision 'v9'"):
        fetch(registry, "org/tiny@v9")
    with pytest.raises(StoreError, match="not a Hub repo id"):
        parse_repo_spec("../etc@x")
    assert_keep_intact(registry)


def test_disk_full(hub: FakeHub, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(NotEnoughSpaceError, match=r"needs .* MB more but .* has only 0.0 MB free"):
        fetch(registry, precision="int8")
    assert not [p for p in hub.paths_requested("GET") if p.endswith(".onnx")]  # checked before fetching
    assert registry.names() == ["keep"]
    assert_keep_intact(registry)


def test_cancel_keeps_partial_for_resume(hub: FakeHub, registry: Registry) -> None:
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(StoreCancelled):
        fetch(registry, precision="int8", cancel=cancel)
    assert registry.names() == ["keep"]
    model = fetch(registry, precision="int8")
    assert model.variants == ("int8",)


def test_checkpoint_repo_skips_pickles(hub: FakeHub, registry: Registry, tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    hub.add_folder("org/ckpt", tmp_path / "ckpt")
    model = fetch(registry, "org/ckpt")
    assert model.kind == "checkpoint"
    assert not (model.path / "unet" / "diffusion_pytorch_model.bin").exists()
    assert (model.path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not [p for p in hub.paths_requested("GET") if p.endswith(".bin")]
