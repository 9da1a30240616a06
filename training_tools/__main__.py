"""``python -m training_tools STAGE CONFIG.json [--dry-run] [--resume]``: one training run.

Prints JSON-lines progress events on stdout (snapgen_app.progress encoding) and a one-line cause on
stderr when it fails. Exit codes: 0 done, 1 failure, 2 bad config/usage, 130 stopped (SIGTERM,
--stop-after or --max-minutes) with a checkpoint to resume from. Runs unchanged under
``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from snapgen_app.errors import ConfigError, SnapGenError, UsageError
from training_tools.config import STAGES, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training_tools", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES, help="which training stage to run")
    parser.add_argument("config", help="TrainConfig JSON file")
    parser.add_argument("--dry-run", action="store_true", help="print only the memory/time estimate")
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's run_dir")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop with a checkpoint after this many steps"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop with a checkpoint once the training loop has run this long (ETA counts against it)",
    )
    parser.add_argument(
        "--device-tflops",
        type=float,
        default=None,
        help="estimate with this device speed instead of measuring",
    )
    return parser


def load_config(path: str, stage: str) -> TrainConfig:
    """Read the config; its ``stage`` (when present) must equal the command line's."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "expected a JSON object")
    if raw.setdefault("stage", stage) != stage:
        raise ConfigError("stage", f"the config says {raw['stage']!r} but the command asks for {stage!r}")
    return TrainConfig.from_dict(raw)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.stage)
        if args.max_minutes is not None and not args.max_minutes > 0:
            raise UsageError(f"--max-minutes must be positive, got {args.max_minutes}")
        from training_tools.trainer import Trainer  # torch is imported only past argument checks

        trainer = Trainer(
            cfg,
            resume=args.resume,
            dry_run=args.dry_run,
            stop_after=args.stop_after,
            max_seconds=None if args.max_minutes is None else args.max_minutes * 60.0,
            device_tflops=args.device_tflops,
        )
        trainer.run()
    except SnapGenError as exc:
        print(f"training_tools: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the disk filled, a folder went away or lost its permissions mid-run
        print(
            f"training_tools: error: {exc} (free disk space or fix the folder, then run the same "
            "command with --resume: it goes on from the last checkpoint)",
            file=sys.stderr,
        )
        return 1
    if trainer.teardown_hung:  # the run is saved; a stuck process-group thread must not keep us alive
        print("training_tools: warning: process-group teardown did not return; leaving", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
