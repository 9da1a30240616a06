"""``python -m training_tools.emoji_world build|curate ...``: dataset builder and class curation."""

from __future__ import annotations

import argparse
import json
import sys

from snapgen_app.errors import SnapGenError

from .curation import curate, save_classes
from .dataset_builder import DEFAULT_MIX, BuildConfig, build, parse_mix


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training_tools.emoji_world", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write PNGs + metadata.jsonl + classes.json into --out")
    b.add_argument("--out", required=True, help="empty directory to fill")
    b.add_argument("--seed", type=int, default=0, help="image seed (image i uses rng([seed, i, 1]))")
    b.add_argument("--num-images", type=int, default=2000)
    b.add_argument("--num-classes", type=int, default=200, help="150-300 recommended")
    b.add_argument("--class-seed", type=int, default=0, help="seed of the class curation")
    mix = ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items())
    b.add_argument("--mix", default=mix, help=f"kind weights (default {mix})")
    b.add_argument("--p-background", type=float, default=0.75, help="how often captions name the background")
    b.add_argument("--p-alias", type=float, default=0.2, help="how often an alias replaces the class name")
    b.add_argument("--workers", type=int, default=1, help="processes (results do not depend on it)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    c = sub.add_parser("curate", help="write the class list JSON only")
    c.add_argument("--out", required=True, help="classes.json to write")
    c.add_argument("--num-classes", type=int, default=200)
    c.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad usage)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "curate":
            classes = curate(args.num_classes, args.seed)
            save_classes(classes, args.out, seed=args.seed)
            print(f"wrote {len(classes)} classes to {args.out}")
            return 0
        config = BuildConfig(
            num_images=args.num_images,
            seed=args.seed,
            num_classes=args.num_classes,
            class_seed=args.class_seed,
            mix=parse_mix(args.mix),
            p_background=args.p_background,
            p_alias=args.p_alias,
        )
        summary = build(args.out, config, workers=args.workers)
    except SnapGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {summary['num_images']} images to {args.out} in {summary['seconds']} s "
            f"({summary['images_per_second']} img/s); kinds {summary['kinds']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
