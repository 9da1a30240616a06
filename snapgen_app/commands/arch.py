"""``snapgen arch``: parameters and GFLOPs per UNet step of the UNet presets, and the paper's
ablation chain step by step. Counts run on torch's meta device (no weights are allocated); torch is
imported only when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "arch",
        help="parameters and GFLOPs per step of the UNet presets",
        description=(
            "Print parameters and GFLOPs of one UNet forward (batch 1) at 256, 512 and 1024 px for every "
            "UNet preset, and for the ablation chain (sdxl-thin -> ... -> stage1-ca) each step's change next "
            "to the change the SnapGen paper reports. Needs the `train` extra (torch)."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--presets", nargs="+", metavar="NAME", help="only these presets (default: all)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from snapgen_app.cli import print_json
    from snapgen_app.errors import SnapGenError

    try:
        from snapgen_app.model.arch import architecture_rows, format_table
    except ModuleNotFoundError as exc:
        raise SnapGenError(
            f"`snapgen arch` needs {exc.name}",
            hint="install the train extra: pip install 'snapgen-studio[train]'",
        ) from None
    rows = architecture_rows(args.presets)
    if args.json:
        print_json(rows)
    else:
        print(format_table(rows))
    return 0
