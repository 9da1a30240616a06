"""``snapgen train pretrain|distill|step-distill|finetune CONFIG.json``: run a training stage.

The application never imports torch to train: this command starts ``python -m training_tools``
as a subprocess (in the training environment, optionally under ``accelerate launch``) and reads its
JSON-lines events (snapgen_app.progress.decode_event) to show progress, or passes them through with
``--json``. Ctrl-C asks the trainer to stop with SIGTERM: it writes a checkpoint and exits, and
``--resume`` continues the run exactly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from snapgen_app.errors import UsageError
from snapgen_app.finetune import training_python
from snapgen_app.progress import Event, decode_event

STAGES = ("pretrain", "distill", "step-distill", "finetune")

DESCRIPTION = """Train a SnapGen model: one stage of the paper's recipe, from a TrainConfig JSON file.

Stages: pretrain (flow matching from scratch), distill (multi-level knowledge distillation from a
teacher), step-distill (adversarial step distillation to 4 or 8 steps), finetune (LoRA or full, on
your own pictures, with the base model as teacher). A memory and time estimate is printed first;
--dry-run prints only that. The run directory of the config is never overwritten: --resume
continues a stopped run exactly (Ctrl-C stops with a checkpoint). Several processes or GPUs:
--launcher "accelerate launch --multi_gpu --num_processes 8" (see docs/training.md).
Needs the 'train' extra (torch, diffusers, accelerate, peft) in the Python that runs the trainer."""


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train, distill or fine-tune a model (runs training_tools in a subprocess)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=STAGES, help="training stage")
    parser.add_argument("config", metavar="CONFIG.json", help="TrainConfig file (see docs/training.md)")
    parser.add_argument("--dry-run", action="store_true", help="print only the memory/time estimate")
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's run_dir")
    parser.add_argument(
        "--max-minutes",
        type=float,
        metavar="M",
        help="stop with a checkpoint after M minutes of training (continue later with --resume)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the trainer's JSON-lines events as they come"
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        default=None,
        help="Python of the training environment (default: $SNAPGEN_TRAIN_PYTHON, else this Python "
        "when it has torch)",
    )
    parser.add_argument(
        "--launcher",
        metavar="CMD",
        default="",
        help='prefix such as "accelerate launch --multi_gpu --num_processes 8" (its -m training_tools is added)',
    )
    parser.add_argument(
        "--device-tflops", type=float, metavar="X", help="estimate time with this device speed (TFLOP/s)"
    )
    parser.set_defaults(handler=run)


def trainer_command(args: argparse.Namespace) -> list[str]:
    """The child command line: [launcher or python] -m training_tools STAGE CONFIG [flags]."""
    prefix = shlex.split(args.launcher) if args.launcher else [args.python or training_python()]
    command = [*prefix, "-m", "training_tools", args.stage, str(Path(args.config).resolve())]
    if args.dry_run:
        command.append("--dry-run")
    if args.resume:
        command.append("--resume")
    if args.max_minutes is not None:
        command += ["--max-minutes", str(args.max_minutes)]
    if args.device_tflops:
        command += ["--device-tflops", str(args.device_tflops)]
    return command


def format_event(event: Event) -> str | None:
    """One human line for an event (None for events not worth a line)."""
    if event.kind == "progress":
        loss = event.data.get("loss", {})
        terms = " ".join(f"{k}={v:.4f}" for k, v in loss.items() if isinstance(v, (int, float)))
        speed = event.data.get("samples_per_s")
        eta = f" eta {event.eta_s / 60:.1f} min" if event.eta_s is not None else ""
        rate = f" {speed:.1f} img/s" if speed else ""
        return f"[{event.stage}] step {event.step}/{event.total} {terms}{rate}{eta}"
    if event.kind == "preview":
        return f"[{event.stage}] samples: {', '.join(event.data.get('samples', []))}"
    if event.message:
        return f"[{event.stage}] {event.kind}: {event.message}"
    return None


def stream_events(stdout: IO[str], json_mode: bool, out: IO[str]) -> Event | None:
    """Relay the child's lines until it closes stdout; returns the last event seen."""
    last: Event | None = None
    for line in stdout:
        text = line.rstrip("\n")
        try:
            event = decode_event(text)
        except ValueError:
            print(text, file=sys.stderr)  # a library's stray print: not an event, keep it visible
            continue
        last = event
        if json_mode:
            out.write(text + "\n")
        else:
            shown = format_event(event)
            if shown:
                out.write(shown + "\n")
        out.flush()
    return last


def run(args: argparse.Namespace) -> int:
    """Start the trainer, relay its events, return 0 / 1 / 2 / 130 as the trainer ended."""
    if not Path(args.config).is_file():
        raise UsageError(
            f"config file {args.config} does not exist", hint="write a TrainConfig JSON (docs/training.md)"
        )
    env = dict(os.environ)
    # The trainer must import the installed packages, never a same-named folder of the current directory.
    env["PYTHONSAFEPATH"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    command = trainer_command(args)
    try:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    except FileNotFoundError:
        raise UsageError(
            f"cannot start {command[0]}", hint="pass --python with the training environment's Python"
        ) from None
    try:
        assert child.stdout is not None
        stream_events(child.stdout, args.json, sys.stdout)
        code = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits
        assert child.stdout is not None
        stream_events(child.stdout, args.json, sys.stdout)
        child.wait()
        print("snapgen: training stopped with a checkpoint; continue with --resume", file=sys.stderr)
        return 130
    if code in (0, 2, 130):
        return code
    return 1
