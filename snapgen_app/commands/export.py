"""``snapgen export CHECKPOINT_DIR --out BUNDLE_DIR``: checkpoint (diffusers layout) -> runtime bundle.

Torch is imported only inside the handler (through ``snapgen_app.model.export``), so building the
parser costs nothing for the torch-free commands. Needs the ``train`` extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from snapgen_app.errors import SnapGenError, UsageError

PRECISIONS = ("fp32", "fp16", "int8")

DESCRIPTION = """Export a SnapGen checkpoint to a runtime bundle (ONNX + bundle.json).

CHECKPOINT_DIR is a diffusers-layout folder: model_index.json, unet/, autoencoder/ (or vae/) and
text_conditioner/ (see docs/bundle-format.md). Each component is exported to ONNX and compared with
torch on fixed seeded inputs (several timesteps for the UNet); the export fails when a variant drifts
past its threshold. int8 = static QDQ for UNet and decoder (Conv + weight MatMul only, calibrated on
real denoising trajectories) and dynamic int8 for the text encoder; fp16 keeps norms, softmax, exp
and pow in fp32. The bundle is written to a temporary folder and renamed into place at the end, so
nothing half-written is ever left at BUNDLE_DIR. Needs the 'train' extra (torch, onnx)."""


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to a runtime bundle (ONNX)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="diffusers-layout checkpoint folder")
    parser.add_argument(
        "--out",
        required=True,
        metavar="BUNDLE_DIR",
        help="bundle folder to create (must not exist or be empty)",
    )
    parser.add_argument(
        "--precision",
        default="int8,fp32",
        metavar="LIST",
        help="comma-separated variants among fp32, fp16, int8 (default: int8,fp32)",
    )
    parser.add_argument(
        "--name", metavar="NAME", help="model name in bundle.json (default: the checkpoint folder name)"
    )
    parser.add_argument(
        "--license",
        metavar="TEXT",
        help="license string for bundle.json (default: model_index.json's _license)",
    )
    parser.add_argument(
        "--calib-prompts",
        type=int,
        default=4,
        metavar="N",
        help="calibration trajectories for int8 (default 4; with --calib-prompt-file, one per line of it)",
    )
    parser.add_argument(
        "--calib-prompt-file",
        metavar="FILE",
        help="calibrate int8 on these prompts (one per line; use prompts of the model's world) "
        "instead of the built-in generic ones",
    )
    parser.add_argument(
        "--calib-guidance",
        type=float,
        metavar="G",
        help="classifier-free guidance of the calibration trajectories (default: the model's default "
        "guidance); above 1 the unconditional inputs are calibrated too",
    )
    parser.add_argument(
        "--calib-steps",
        type=int,
        default=8,
        metavar="N",
        help="Euler steps per calibration trajectory (default 8)",
    )
    parser.add_argument(
        "--calib-px",
        type=int,
        metavar="PX",
        help="image size of the calibration trajectories (default: min(default size, 512))",
    )
    parser.add_argument(
        "--static-shapes", action="store_true", help="export fixed shapes instead of dynamic batch/size axes"
    )
    parser.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="torch.onnx exporter (default dynamo; torchscript is faster for small models but rejects enable_gqa attention)",
    )
    parser.add_argument("--json", action="store_true", help="print the written bundle.json as JSON")
    parser.set_defaults(handler=handle)


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"int8,fp32"`` -> ("int8", "fp32"); UsageError naming the allowed values otherwise."""
    items = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise UsageError(
            f"--precision: {', '.join(bad) or repr(text)} is not a precision; allowed: {', '.join(PRECISIONS)}"
        )
    return items


def handle(args: argparse.Namespace) -> int:
    precisions = parse_precisions(args.precision)
    for flag in ("calib_prompts", "calib_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    calibration_prompts: tuple[str, ...] = ()
    if args.calib_prompt_file:
        try:
            lines = Path(args.calib_prompt_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"--calib-prompt-file: cannot read {args.calib_prompt_file}: {exc}") from None
        calibration_prompts = tuple(line.strip() for line in lines if line.strip())
        if not calibration_prompts:
            raise UsageError(f"--calib-prompt-file: {args.calib_prompt_file} holds no prompt")
    if args.calib_guidance is not None and args.calib_guidance < 1.0:
        raise UsageError(f"--calib-guidance must be >= 1, got {args.calib_guidance:g}")
    try:
        from snapgen_app.model.export import ExportOptions, export_bundle
    except ImportError as exc:
        raise SnapGenError(
            f"export needs the training dependencies ({exc.name} is missing)",
            hint="pip install 'snapgen-studio[train]'",
        ) from None

    options = ExportOptions(
        precisions=precisions,
        name=args.name,
        calib_prompts=args.calib_prompts,
        calibration_prompts=calibration_prompts,
        calib_guidance=args.calib_guidance,
        calib_steps=args.calib_steps,
        calib_px=args.calib_px,
        dynamic=not args.static_shapes,
        exporter=args.exporter,
        license=args.license,
    )
    quiet = bool(args.json)
    summary = export_bundle(
        Path(args.checkpoint),
        Path(args.out),
        options,
        log=(lambda _m: None) if quiet else (lambda m: print(f"export: {m}", file=sys.stderr, flush=True)),
    )
    if args.json:
        from snapgen_app.cli import print_json

        print_json(
            {
                "bundle": str(summary.bundle_dir),
                "seconds": round(summary.seconds, 1),
                "manifest": summary.manifest,
            }
        )
        return 0
    print(f"wrote {summary.bundle_dir} in {summary.seconds:.0f} s")
    for precision, variant in summary.manifest["variants"].items():
        checks = ", ".join(
            f"{c} {p['metric']}={p['value']:.3g} (limit {p['threshold']:g})"
            for c, p in variant["parity"].items()
        )
        print(f"  {precision}: {checks}")
    return 0
