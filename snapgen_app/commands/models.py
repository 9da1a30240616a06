"""``snapgen models list|info|download|import|verify|remove|repair``: the local model store.

Every action takes ``--json``. Errors from the store print one line
``snapgen: error: <message> (<hint>)`` and exit 1; bad usage (e.g. ``remove`` without ``--yes``)
exits 2. Nothing here reaches the network except ``download``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from model_store.errors import StoreError

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: Any) -> None:
    """Add ``models`` and its actions to the ``snapgen`` parser."""
    parser = subparsers.add_parser(
        "models",
        help="list, download, import, verify and remove models",
        description="Manage installed models: list them (or the catalog), show one, download from the "
        "Hugging Face Hub (pinned to a commit, verified by sha256), import a folder or .zip, re-verify "
        "the files, remove, or repair the index. Models live under $SNAPGEN_HOME (or the user data folder).",
    )
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")
    parser.set_defaults(handler=lambda _args: _usage(parser))

    p = actions.add_parser("list", help="installed models (or --available: the catalog)")
    p.add_argument("--available", action="store_true", help="show the catalog of known models instead")
    _json(p).set_defaults(handler=_guard(_list))

    p = actions.add_parser("info", help="details of one installed model")
    p.add_argument("name", help="model name (see `snapgen models list`)")
    _json(p).set_defaults(handler=_guard(_info))

    p = actions.add_parser(
        "download",
        help="download REPO[@REVISION] from the Hugging Face Hub",
        description="Download a runtime bundle or diffusers checkpoint. The revision (branch, tag or commit; "
        "default main) is pinned to its commit hash. Interrupted downloads resume when run again. "
        "The token comes from HF_TOKEN or `hf auth login`; HF_HUB_OFFLINE=1 forbids downloads.",
    )
    p.add_argument("repo", metavar="REPO[@REVISION]", help="e.g. org/model or org/model@v1.0")
    p.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), help="fetch only this variant of a bundle"
    )
    p.add_argument("--name", help="install under this name (default: the bundle's or repo's name)")
    p.add_argument("--force", action="store_true", help="replace an installed model of the same name")
    p.add_argument(
        "--retries", type=int, default=3, help="retries per file after a network error (default 3)"
    )
    _json(p).set_defaults(handler=_guard(_download))

    p = actions.add_parser("import", help="import a model folder or .zip (bundle or diffusers checkpoint)")
    p.add_argument("path", help="folder with bundle.json or model_index.json, or a .zip of one")
    p.add_argument("--name", help="install under this name (default: the bundle's or folder's name)")
    p.add_argument("--link", action="store_true", help="link to the folder instead of copying it")
    p.add_argument("--force", action="store_true", help="replace an installed model of the same name")
    _json(p).set_defaults(handler=_guard(_import))

    p = actions.add_parser("verify", help="re-hash a model's files against its bundle.json")
    p.add_argument("name")
    _json(p).set_defaults(handler=_guard(_verify))

    p = actions.add_parser("remove", help="delete an installed model (needs --yes)")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="confirm the removal")
    _json(p).set_defaults(handler=_guard(_remove))

    p = actions.add_parser("repair", help="rebuild the index from the folders on disk")
    _json(p).set_defaults(handler=_guard(_repair))


def _json(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _guard(handler: Handler) -> Handler:
    """Turn a StoreError into the one-line message and its exit code (2 for bad usage, else 1)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except StoreError as exc:
            print(f"snapgen: error: {exc}", file=sys.stderr)
            return exc.exit_code

    return run


def _print_json(payload: object) -> None:
    from snapgen_app.cli import print_json

    print_json(payload)


def _registry() -> Any:
    from model_store.registry import Registry

    return Registry()


def _size(n: int | None) -> str:
    """Human size in decimal units (what file managers show)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


# ----------------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    if args.available:
        from model_store.catalog import load_catalog

        entries = load_catalog()
        installed = set(_registry().names())
        if args.json:
            _print_json([{**e.to_dict(), "installed": e.name in installed} for e in entries])
            return 0
        for e in entries:
            where = "built-in" if e.builtin else e.download_spec
            mark = " (installed)" if e.name in installed else ""
            print(f"{e.name}{mark}  {where}  {_size(e.size_bytes)}  {e.license}\n    {e.description}")
        return 0
    registry = _registry()
    models = registry.list()
    usage = registry.disk_usage()
    if args.json:
        _print_json(
            {
                "models": [m.to_dict() for m in models],
                "default": registry.default_model_name(),
                "disk_usage_bytes": usage["total"],
            }
        )
        return 0
    if not models:
        print("no models installed (download one with `snapgen models download REPO`)")
        return 0
    default = registry.default_model_name()
    for m in models:
        star = "*" if m.name == default else " "
        source = m.source.type + (
            f" {m.source.repo}@{(m.source.revision or '')[:12]}" if m.source.repo else ""
        )
        variants = ",".join(m.variants) or "-"
        print(f"{star} {m.name:<24} {m.kind:<10} {variants:<16} {_size(m.size_bytes):>9}  {source}")
    print(f"total on disk: {_size(usage['total'])}  (* = default model)")
    return 0


def _info(args: argparse.Namespace) -> int:
    model = _registry().resolve(args.name)
    data = model.to_dict()
    if model.has_bundle:
        from model_store.bundle import read_manifest

        manifest = read_manifest(model.path)
        data["defaults"] = manifest.to_dict()["defaults"]
        data["available_precisions"] = list(manifest.precisions)
        data["provenance"] = manifest.to_dict()["provenance"]
    if args.json:
        _print_json(data)
        return 0
    for key, value in data.items():
        print(f"{key}: {value}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from model_store.download import DownloadProgress, download_model

    def show(p: DownloadProgress) -> None:
        if sys.stderr.isatty():
            eta = f"{p.eta_s:.0f} s" if p.eta_s is not None else "?"
            print(
                f"\r{p.files_done}/{p.files_total} files  {_size(p.bytes_done)}/{_size(p.bytes_total)}  "
                f"{_size(int(p.bytes_per_s))}/s  ETA {eta}   ",
                end="",
                file=sys.stderr,
            )

    model = download_model(
        args.repo,
        precision=args.precision,
        name=args.name,
        overwrite=args.force,
        max_retries=max(args.retries, 0),
        registry=_registry(),
        progress=show,
    )
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return _report(model, args, "downloaded")


def _import(args: argparse.Namespace) -> int:
    from model_store.imports import import_model

    model = import_model(
        args.path, name=args.name, link=args.link, overwrite=args.force, registry=_registry()
    )
    return _report(model, args, "imported")


def _report(model: Any, args: argparse.Namespace, verb: str) -> int:
    if args.json:
        _print_json(model.to_dict())
    else:
        pinned = f" at {model.source.revision}" if model.source.revision else ""
        print(
            f"{verb} {model.name} ({model.kind}, {','.join(model.variants) or '-'}){pinned} -> {model.path}"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    checks = _registry().verify(args.name)
    bad = [c for c in checks if c.status in ("missing", "mismatch")]
    if args.json:
        _print_json({"name": args.name, "ok": not bad, "files": [c.to_dict() for c in checks]})
    else:
        for check in checks:
            print(check.describe())
        print(f"{args.name}: {'ok' if not bad else f'{len(bad)} file(s) failed'}")
    if bad:
        print(
            f"snapgen: error: {args.name} failed verification: {', '.join(c.path for c in bad)} "
            "(re-download or re-import the model)",
            file=sys.stderr,
        )
        return 1
    return 0


def _remove(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            f"snapgen: error: removing {args.name!r} deletes its files; add --yes to confirm", file=sys.stderr
        )
        return 2
    model = _registry().remove(args.name)
    if args.json:
        _print_json({"removed": model.name})
    else:
        print(f"removed {model.name}")
    return 0


def _repair(args: argparse.Namespace) -> int:
    report = _registry().repair()
    if args.json:
        _print_json(report.to_dict())
    else:
        print(
            f"added {list(report.added)}, dropped {list(report.dropped)}, refreshed {list(report.refreshed)}"
        )
        for name, why in report.skipped.items():
            print(f"skipped {name}: {why}")
    return 0
