"""service.generate on a full disk (or a used-up quota): a SnapGenError saying the disk is full and
what to do, an ``error`` event with the same text, and nothing left in the output folder. Other
write errors keep their own message."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from test_runtime_fixtures import build_bundle

from snapgen_app import service
from snapgen_app.api import GenerationRequest
from snapgen_app.errors import SnapGenError
from snapgen_app.progress import Event


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundles") / "tiny", precisions=("fp32",))


def _fail_in(folder: Path, code: int, monkeypatch: pytest.MonkeyPatch, call: str) -> list[str]:
    """Make ``os.<call>`` (fsync: the data is flushed; replace: the name is created, by os.replace
    or, for names the application chose, os.link) fail with ``code`` for files under ``folder``;
    returns the paths it refused."""
    refused: list[str] = []
    for name in ("replace", "link") if call == "replace" else (call,):
        real = getattr(os, name)

        def failing(*args: object, real: object = real) -> object:
            target = os.readlink(f"/proc/self/fd/{args[0]}") if call == "fsync" else str(args[1])
            if target.startswith(str(folder)):
                refused.append(target)
                raise OSError(code, os.strerror(code))
            return real(*args)  # type: ignore[operator]

        monkeypatch.setattr(os, name, failing)
    return refused


@pytest.mark.parametrize(
    ("code", "call"), [(errno.ENOSPC, "fsync"), (errno.EDQUOT, "fsync"), (errno.ENOSPC, "replace")]
)
def test_full_disk_is_a_clear_error_and_writes_nothing(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, call: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.png").write_bytes(b"an image from before")
    refused = _fail_in(out, code, monkeypatch, call)
    events: list[Event] = []
    request = GenerationRequest(prompt="a red apple", model=str(bundle), seed=1, steps=2, num_images=2)
    with pytest.raises(SnapGenError) as caught:
        service.generate(request.replace(output_dir=str(out)), on_event=events.append)
    assert refused, "the write really failed"
    error = caught.value
    assert error.message.startswith("the disk is full: 2 image(s) could not be written to " + str(out))
    assert "free some space" in (error.hint or "")
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == code
    assert events[-1].kind == "error" and events[-1].message == str(error)
    assert sorted(p.name for p in out.iterdir()) == ["earlier.png"], "no image and no temp file left"
    assert (out / "earlier.png").read_bytes() == b"an image from before"


def test_other_write_errors_keep_their_message(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _fail_in(out, errno.EACCES, monkeypatch, "fsync")
    request = GenerationRequest(prompt="a red apple", model=str(bundle), seed=1, steps=1, output_dir=str(out))
    with pytest.raises(SnapGenError) as caught:
        service.generate(request)
    assert "disk is full" not in str(caught.value) and "Permission denied" in str(caught.value)
    assert not list(out.glob("*.png")) and not list(out.glob(".*"))
