"""Where the model store lives on disk.

``<home>`` is ``$SNAPGEN_HOME`` when set, else platformdirs ``user_data_dir("snapgen-studio")``.
Under it: ``models/<name>/`` (one folder, or a symlink for linked imports, per model),
``registry.json`` (the index), ``registry.lock`` (the inter-process lock file) and ``staging/``
(downloads and imports in progress; partial downloads stay there for resume).
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "snapgen-studio"
HOME_ENV = "SNAPGEN_HOME"
BUILTIN_ENV = "SNAPGEN_BUILTIN_DIR"


def store_home() -> Path:
    """The data folder: ``$SNAPGEN_HOME`` or platformdirs' user data dir for snapgen-studio."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME, appauthor=False))


def builtin_dir() -> Path:
    """``model_store/builtin/``: shipped bundles, one folder per built-in model.

    ``$SNAPGEN_BUILTIN_DIR`` points elsewhere (tests use an empty folder so that what they see does
    not depend on which built-in models this checkout ships)."""
    override = os.environ.get(BUILTIN_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent / "builtin"


def catalog_path() -> Path:
    """``model_store/catalog.json``: the models the application knows about."""
    return Path(__file__).resolve().parent / "catalog.json"
