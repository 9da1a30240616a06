"""``model_store/catalog.json``: the models SnapGen Studio knows about (shown by ``models list --available``).

Schema (format_version 1)::

    {"format_version": 1, "models": [
        {"name": str, "description": str, "license": str, "builtin": bool,
         "repo": "org/name" | null, "revision": 40-hex commit | null, "size_bytes": int | null,
         "precisions": [str, ...]}]}

A downloadable entry must pin ``revision`` to a commit hash. There are no public SnapGen weights
today, so the catalog holds only the built-in model; entries are added when real repos exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_store import paths
from model_store.bundle import PRECISIONS
from model_store.errors import ManifestError

CATALOG_FORMAT_VERSION = 1
_KEYS = ("name", "description", "license", "builtin", "repo", "revision", "size_bytes", "precisions")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class CatalogEntry:
    """One known model. ``repo``/``revision`` are None for the built-in model."""

    name: str
    description: str
    license: str
    builtin: bool
    repo: str | None
    revision: str | None
    size_bytes: int | None
    precisions: tuple[str, ...]

    @property
    def download_spec(self) -> str | None:
        """``org/name@commit`` for ``snapgen models download``, None for the built-in model."""
        return f"{self.repo}@{self.revision}" if self.repo and self.revision else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["precisions"] = list(self.precisions)
        return data

    @classmethod
    def from_dict(cls, raw: object, where: str) -> CatalogEntry:
        if not isinstance(raw, dict):
            raise ManifestError(f"catalog: {where} must be an object")
        unknown, missing = sorted(set(raw) - set(_KEYS)), [k for k in _KEYS if k not in raw]
        if unknown or missing:
            raise ManifestError(f"catalog: {where} has unknown keys {unknown} / missing keys {missing}")
        precisions = raw["precisions"]
        if not isinstance(precisions, list) or not set(precisions) <= set(PRECISIONS):
            raise ManifestError(f"catalog: {where}.precisions must be a subset of {list(PRECISIONS)}")
        entry = cls(**{**raw, "precisions": tuple(precisions)})
        if not entry.builtin and not (entry.repo and entry.revision and _COMMIT_RE.match(entry.revision)):
            raise ManifestError(f"catalog: {where} ({entry.name}) must pin repo and a 40-hex commit revision")
        return entry


def load_catalog(path: str | os.PathLike[str] | None = None) -> list[CatalogEntry]:
    """Parse the catalog strictly (default: the packaged ``model_store/catalog.json``)."""
    source = Path(path) if path is not None else paths.catalog_path()
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read the catalog {source}: {exc}") from exc
    if not isinstance(raw, dict) or set(raw) != {"format_version", "models"}:
        raise ManifestError(f"catalog {source} must hold exactly format_version and models")
    if raw["format_version"] != CATALOG_FORMAT_VERSION:
        raise ManifestError(
            f"catalog format_version {raw['format_version']!r} is not {CATALOG_FORMAT_VERSION}"
        )
    return [CatalogEntry.from_dict(item, f"models[{i}]") for i, item in enumerate(raw["models"])]
