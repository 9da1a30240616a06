"""``snapgen``: the command line.

Each subcommand lives in ``snapgen_app/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``handler`` (``args -> int``). Modules are imported only to build
the parser; anything heavy (torch for ``arch``/``export``) is imported inside the handler, so
``snapgen generate`` never loads torch.

Exit codes (DESIGN.md): 0 success, 2 bad usage, 1 failure with a one-line cause and what to do.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from model_store.errors import StoreError
from snapgen_app import __version__
from snapgen_app.errors import SnapGenError

COMMAND_MODULES: tuple[str, ...] = (
    "generate",
    "models",
    "export",
    "train",
    "eval",
    "bench",
    "arch",
    "devices",
)


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage already; keep its one-line message format."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snapgen",
        description="SnapGen Studio: offline few-step text-to-image generation with SnapGen models.",
    )
    parser.add_argument("--version", action="version", version=f"snapgen-studio {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    parser.add_argument(
        "--selftest", action="store_true", help="generate with the built-in model and verify it"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"snapgen_app.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"snapgen_app.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def print_json(payload: object) -> None:
    """Machine-readable output for ``--json``: one JSON document on stdout."""
    json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.selftest:
        from snapgen_app.commands.generate import selftest

        return selftest()
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except SnapGenError as exc:
        print(f"snapgen: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StoreError as exc:  # the model store's own tree (it imports nothing of ours)
        print(f"snapgen: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("snapgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
