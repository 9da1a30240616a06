"""``snapgen bench``: SnapGen vs SDXL vs SD1.5 on this machine (see snapgen_app/model/bench.py).

The implementation needs torch (it builds and exports the reference architectures), so it is
imported inside the handler only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from snapgen_app.errors import SnapGenError, UsageError

DESCRIPTION = """Benchmark SnapGen against the SDXL and SD1.5 UNets on this machine, in one run.

Per-step UNet latency through ONNX Runtime (CPU, 2 threads, ORT_ENABLE_ALL) for snapgen-t2i, SD1.5
and SDXL (random weights from their public configs, exported and quantized the same way) at 512 and
1024 px in fp32 and int8; the tiny decoder vs the SD3 VAE decoder at 1024 px; counted GFLOPs and the
share of the measured MatMul peak; peak memory; a 4-step 1024 px image end to end; int8 quality on a
briefly trained tiny model. Graphs that do not fit this machine's memory in ONNX Runtime (SDXL) are
timed in torch eager together with snapgen-t2i, and the report says so. Medians of --runs runs.
Writes docs/performance.md (or --out). The full run takes about 30-40 minutes on 2 cores; --quick is
a smoke test of every code path at 256 px (a few minutes; its numbers mean nothing)."""


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark SnapGen vs SDXL/SD1.5 on this machine",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke-test settings (256 px, 2 runs, 15 s training)"
    )
    parser.add_argument(
        "--runs", type=int, metavar="N", help="timed runs per measurement (default 5; quick 2)"
    )
    parser.add_argument(
        "--archs", metavar="LIST", help="comma-separated subset of snapgen-t2i,sd15,sdxl (default: all)"
    )
    parser.add_argument(
        "--resolutions", metavar="LIST", help="comma-separated image sizes (default 512,1024; quick 256)"
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        metavar="S",
        help="training time of the tiny quality model (default 90)",
    )
    parser.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        help="torch.onnx exporter for every graph (default torchscript: the same graphs, about 10x faster to export)",
    )
    parser.add_argument(
        "--sdxl-onnx", action="store_true", help="export SDXL to ONNX too (needs > 24 GB free)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE.md",
        help="Markdown report to write (default docs/performance.md; none with --quick; '-' for none)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.set_defaults(handler=handle)


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 or v % 64 for v in values):
        raise UsageError(f"{flag}: sizes must be positive multiples of 64, got {text!r}")
    return values


def handle(args: argparse.Namespace) -> int:
    try:
        from snapgen_app.model import bench
    except ImportError as exc:
        raise SnapGenError(
            f"bench needs the training dependencies ({exc.name} is missing)",
            hint="pip install 'snapgen-studio[train]'",
        ) from None
    import dataclasses

    settings = bench.BenchSettings.quick_settings() if args.quick else bench.BenchSettings()
    changes: dict[str, Any] = {}
    if args.runs is not None:
        if args.runs < 1:
            raise UsageError(f"--runs must be >= 1, got {args.runs}")
        changes["runs"] = args.runs
    if args.archs:
        archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
        bad = [a for a in archs if a not in ("snapgen-t2i", "sd15", "sdxl")]
        if bad or not archs:
            raise UsageError(f"--archs: unknown {bad or args.archs!r}; allowed: snapgen-t2i, sd15, sdxl")
        changes["archs"] = archs
    if args.resolutions:
        sizes = _int_list("--resolutions", args.resolutions)
        changes.update(resolutions=sizes, decoder_resolution=max(sizes), e2e_resolution=max(sizes))
    if args.train_seconds is not None:
        changes["train_seconds"] = args.train_seconds
    if args.exporter:
        changes["exporter"] = args.exporter
    if args.sdxl_onnx:
        changes["sdxl_in_onnx"] = True
    settings = dataclasses.replace(settings, **changes)
    if args.out is None:
        args.out = "-" if args.quick else "docs/performance.md"
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 - progress on stderr, also with --json
    report = bench.run_bench(settings, log=log)
    if args.out and args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(bench.render_markdown(report))
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        print(bench.render_table(report))
        if args.out and args.out != "-":
            print(f"\nwritten to {args.out}")
    return 0
