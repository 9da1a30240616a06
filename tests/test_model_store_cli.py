"""`snapgen models ...` through snapgen_app.cli.main: list/info/import/verify/remove/download/repair."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from hub_server import FakeHub, make_bundle

from snapgen_app.cli import main


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any outgoing connection fails the test: the store must work offline."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_import_list_info_verify_remove(home: Path, tmp_path: Path, capsys, no_network) -> None:
    make_bundle(tmp_path / "src", name="tiny")
    imported = run_json(capsys, "models", "import", str(tmp_path / "src"), "--json")
    assert imported["name"] == "tiny" and imported["variants"] == ["fp32", "int8"]
    listing = run_json(capsys, "models", "list", "--json")
    assert [m["name"] for m in listing["models"]] == ["tiny"]
    assert listing["default"] == "tiny"
    assert listing["disk_usage_bytes"] > 0
    info = run_json(capsys, "models", "info", "tiny", "--json")
    assert info["source"]["type"] == "import"
    assert info["defaults"]["steps"] == 4
    verify = run_json(capsys, "models", "verify", "tiny", "--json")
    assert verify["ok"] is True and len(verify["files"]) == 6

    (home / "models" / "tiny" / "unet.int8.onnx").write_bytes(b"\x08\x08" + b"\x00" * 2046)
    assert main(["models", "verify", "tiny"]) == 1
    captured = capsys.readouterr()
    assert "unet.int8.onnx: mismatch (sha256" in captured.out
    assert "snapgen: error: tiny failed verification: unet.int8.onnx" in captured.err

    assert main(["models", "remove", "tiny"]) == 2  # needs --yes
    assert "--yes" in capsys.readouterr().err
    assert run_json(capsys, "models", "remove", "tiny", "--yes", "--json") == {"removed": "tiny"}
    assert run_json(capsys, "models", "list", "--json")["models"] == []


def test_errors_are_one_line_with_hint(home: Path, tmp_path: Path, capsys, no_network) -> None:
    assert main(["models", "info", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("snapgen: error: no model named 'nope' is installed; installed: none (")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "model_index.json").write_text("{}")
    (tmp_path / "pickled" / "model.ckpt").write_bytes(b"x")
    assert main(["models", "import", str(tmp_path / "pickled")]) == 1
    assert "pickle files are refused" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["models", "remove"])  # missing NAME: argparse usage error
    assert info.value.code == 2
    # malformed requests are bad usage too (exit 2), not failures (exit 1)
    assert main(["models", "download", "not a repo!"]) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err
    assert main(["models", "import", str(tmp_path / "pickled"), "--name", "My Model"]) == 2
    assert "invalid model name 'My Model'" in capsys.readouterr().err


def test_list_available_shows_catalog(home: Path, capsys, no_network) -> None:
    entries = run_json(capsys, "models", "list", "--available", "--json")
    assert [e["name"] for e in entries] == ["snapgen-emoji"]
    assert entries[0]["builtin"] is True
    assert main(["models", "list", "--available"]) == 0
    assert "snapgen-emoji" in capsys.readouterr().out


def test_download_and_repair(home: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    make_bundle(tmp_path / "repo", name="tiny")
    with FakeHub() as hub:
        commit = hub.add_folder("org/tiny", tmp_path / "repo")
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        model = run_json(capsys, "models", "download", "org/tiny@main", "--precision", "int8", "--json")
        assert model["source"] == {
            "type": "hub",
            "repo": "org/tiny",
            "revision": commit,
            "request": {"revision": "main", "precision": "int8"},
        }
        assert model["variants"] == ["int8"]
        assert main(["models", "download", "org/missing"]) == 1
        assert "snapgen: error: repository 'org/missing' was not found" in capsys.readouterr().err
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        n_requests = len(hub.requests)
        assert main(["models", "download", "org/tiny", "--name", "again"]) == 1
        assert "HF_HUB_OFFLINE" in capsys.readouterr().err
        assert len(hub.requests) == n_requests
    (home / "registry.json").write_text("garbage")
    report = run_json(capsys, "models", "repair", "--json")
    assert report["added"] + report["refreshed"] == ["tiny"]  # rebuilt from the folders on disk
    assert [m["name"] for m in run_json(capsys, "models", "list", "--json")["models"]] == ["tiny"]
