"""PNGs are written with the permissions of any new file (umask), not mkstemp's private 0600, and
names the application chose never replace a file another generation wrote meanwhile."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from snapgen_app.pipeline.png import write_files_atomically, write_png


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_png_mode_follows_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = write_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8), {"prompt": "x"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_name_taken_meanwhile_is_kept_and_the_new_image_takes_the_next(tmp_path: Path) -> None:
    """Two generations with the same seed in the same second choose the same name; the second one
    to write takes NAME-1 (then NAME-2), while a name the user gave (-o) is written as asked."""
    chosen = tmp_path / "20261208-040000-42.png"
    chosen.write_bytes(b"the other generation's image")
    (tmp_path / "20261208-040000-42-1.png").write_bytes(b"and a third one")
    written = write_files_atomically([(chosen, b"mine"), (tmp_path / "b.png", b"b")], keep_existing=True)
    assert written == [tmp_path / "20261208-040000-42-2.png", tmp_path / "b.png"]
    assert chosen.read_bytes() == b"the other generation's image"
    assert written[0].read_bytes() == b"mine"
    assert (
        write_files_atomically([(chosen, b"asked for")]) == [chosen] and chosen.read_bytes() == b"asked for"
    )
    assert not list(tmp_path.glob(".*.tmp"))
