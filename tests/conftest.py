"""Suite-wide guards: no test touches the user's real data directory or a real Qt display."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _isolated_snapgen_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own SNAPGEN_HOME and no built-in models, unless it sets them itself.

    Tests of the shipped built-in model use the ``shipped_builtins`` fixture.
    """
    home = tmp_path_factory.mktemp("snapgen-home")
    monkeypatch.setenv("SNAPGEN_HOME", str(home))
    monkeypatch.setenv("SNAPGEN_BUILTIN_DIR", str(tmp_path_factory.mktemp("no-builtins")))
    return home


@pytest.fixture
def shipped_builtins(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The built-in models this checkout ships (model_store/builtin/)."""
    monkeypatch.delenv("SNAPGEN_BUILTIN_DIR")
    from model_store.paths import builtin_dir

    return builtin_dir()
