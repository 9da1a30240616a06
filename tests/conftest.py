"""Suite-wide guards: no test touches the user's real data directory or a real Qt display."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _isolated_snapgen_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own SNAPGEN_HOME unless it sets one itself."""
    home = tmp_path_factory.mktemp("snapgen-home")
    monkeypatch.setenv("SNAPGEN_HOME", str(home))
    return home
