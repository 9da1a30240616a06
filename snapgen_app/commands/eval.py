"""``snapgen eval MODEL``: EmojiEval, a GenEval-style score for emoji-world models.

Generation runs here, on the torch-free engine (the same path users get). Building the prompt set
and scoring need the emoji classifier (torch), so they run as ``python -m
training_tools.emoji_world.eval`` subprocesses in the training environment: the application never
imports torch or ``training_tools`` itself (DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from snapgen_app import service
from snapgen_app.api import PRECISIONS, GenerationRequest
from snapgen_app.errors import SnapGenError, UsageError
from snapgen_app.finetune import training_python

EVAL_MODULE = "training_tools.emoji_world.eval"
#: Where a model ships its EmojiEval classifier, relative to its folder.
CLASSIFIER_SUBDIR = Path("eval") / "classifier"
#: Per-prompt results, written next to the images.
RESULTS_FILE = "results.json"

DESCRIPTION = """Score a model on EmojiEval: a fixed, seeded prompt set in five categories (single
object, two objects, counting 1-4, background colour, position), each image checked by an emoji
classifier and an object finder; also a Frechet distance on the classifier's features.

Needs the training environment (pip install "snapgen-studio[train]") for the classifier."""


def register(subparsers: Any) -> None:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="score a model on EmojiEval",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="installed model name or bundle folder")
    parser.add_argument(
        "--classifier", metavar="DIR", help=f"EmojiEval classifier (default: MODEL/{CLASSIFIER_SUBDIR})"
    )
    parser.add_argument("--steps", type=int, metavar="N", help="sampling steps (default: the model's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument(
        "--guidance-scale", type=float, metavar="G", help="classifier-free guidance (default: the model's)"
    )
    parser.add_argument(
        "--per-category", type=int, default=80, metavar="N", help="prompts per category (default 80)"
    )
    parser.add_argument(
        "--keep-images",
        metavar="DIR",
        help="keep the generated images in DIR, with every prompt's result in DIR/results.json",
    )
    parser.add_argument(
        "--show-misses",
        type=int,
        default=5,
        metavar="N",
        help="list up to N missed prompts with what the scorer saw (default 5; 0 for none)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def _run_eval_module(python: str, args: list[str]) -> str:
    proc = subprocess.run([python, "-m", EVAL_MODULE, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SnapGenError(f"EmojiEval failed: {last}", hint="run with -v or check the classifier folder")
    return proc.stdout


def run(args: argparse.Namespace) -> int:
    root, name = service.resolve_model(args.model)
    classifier = Path(args.classifier) if args.classifier else root / CLASSIFIER_SUBDIR
    if not (classifier / "config.json").is_file():
        raise UsageError(
            f"no EmojiEval classifier at {classifier}",
            hint="pass --classifier DIR (train one: python -m training_tools.emoji_world.classifier train --out DIR)",
        )
    python = training_python()
    with tempfile.TemporaryDirectory(prefix="snapgen-eval-") as tmp:
        images = Path(args.keep_images) if args.keep_images else Path(tmp) / "images"
        images.mkdir(parents=True, exist_ok=True)
        prompts_file = images / "prompts.json"
        _run_eval_module(
            python,
            [
                "prompts",
                "--classifier",
                str(classifier),
                "--out",
                str(prompts_file),
                "--per-category",
                str(args.per_category),
            ],
        )
        prompts = json.loads(prompts_file.read_text())["prompts"]
        started = time.perf_counter()
        for index, prompt in enumerate(prompts):
            request = GenerationRequest(
                prompt=prompt["text"],
                model=str(root),
                seed=int(prompt["seed"]),
                steps=args.steps,
                precision=args.precision,
                guidance_scale=args.guidance_scale,
                output_paths=(str(images / f"{index:05d}.png"),),
            )
            service.generate(request)
            if not args.json and (index + 1) % 50 == 0:
                print(f"generated {index + 1}/{len(prompts)}", file=sys.stderr)
        seconds = time.perf_counter() - started
        results_file = images / RESULTS_FILE
        output = _run_eval_module(
            python,
            [
                "score",
                "--images",
                str(images),
                "--classifier",
                str(classifier),
                "--prompts",
                str(prompts_file),
                "--json",
                "--per-prompt",
                str(results_file),
            ],
        )
        results = json.loads(results_file.read_text())["prompts"]
    report = json.loads(output)
    report.update(
        model=name, steps=args.steps, precision=args.precision, generation_seconds=round(seconds, 2)
    )
    if args.keep_images:
        report["results_file"] = str(results_file)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(f"EmojiEval for {name} ({len(prompts)} prompts, {seconds:.1f} s generating)")
        for category, value in sorted(report["per_category"].items()):
            print(f"  {category:<16} {value:6.3f}")
        print(f"  {'overall':<16} {report['overall']:6.3f}")
        if report.get("frechet_distance") is not None:
            print(f"  {'frechet':<16} {report['frechet_distance']:6.2f}")
        print_misses(results, args.show_misses)
        if args.keep_images:
            print(f"images and every prompt's result: {images} ({RESULTS_FILE})")
    return 0


def print_misses(results: list[dict[str, Any]], limit: int) -> None:
    """Up to ``limit`` missed prompts, spread over the categories, with what the scorer saw."""
    misses = [r for r in results if not r["correct"]]
    if limit <= 0 or not misses:
        return
    by_category: dict[str, list[dict[str, Any]]] = {}
    for miss in misses:
        by_category.setdefault(miss["category"], []).append(miss)
    picked: list[dict[str, Any]] = []
    while len(picked) < min(limit, len(misses)):  # round robin: one of each category in turn
        for group in by_category.values():
            if group and len(picked) < limit:
                picked.append(group.pop(0))
    print(f"{len(misses)} of {len(results)} prompts missed; for example:")
    for miss in picked:
        objects = ", ".join(miss["seen_objects"]) or "no object"
        background = miss["seen_background"] or "not uniform"
        print(f'  {miss["image"]}  "{miss["text"]}"  saw: {objects}; background {background}')
