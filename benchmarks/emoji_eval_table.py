"""EmojiEval of a recipe run's models with more prompts than the recipe's own eval, into one JSON.

    .venv/bin/python benchmarks/emoji_eval_table.py runs/emoji-v9 --per-category 200 \
        [--only teacher_28,student_distilled_28,bundle_int8_4] \
        [--folder shipped_int8=model_store/builtin/snapgen-emoji] [--json benchmarks/results/X.json] \
        [--checkpoint teacher_8_cfg=runs/emoji-v9/teacher/final:8:4]

The rows are the recipe's (``Recipe.eval_plan``: checkpoints at 28 steps with CFG, the 4-step
student, the exported bundle in fp32 and int8), scored by the run's classifier with the same fixed
prompts and seeds as every table in docs/training.md; ``--folder NAME=DIR`` adds a bundle folder
(e.g. the shipped model) at its own defaults (steps, guidance), int8; ``--checkpoint NAME=DIR:STEPS:GUIDANCE``
a training checkpoint (a ``final/`` folder, or a trainer checkpoint ``step-N/`` whose EMA weights are
put into the run's ``final/`` layout) at any steps and guidance. Each row is kept in
``RUN/eval-N/NAME.json`` with its images, so an interrupted table resumes; the run's summary and
its 80-prompt ``eval/`` are not touched. At 200 prompts per category a 28-step CFG row takes about
4 minutes on 2 cores, a 4-step bundle row about 1.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_row(recipe: Any, name: str, folder: Path, results_dir: Path, per_category: int) -> dict[str, Any]:
    from training_tools.recipes.ship import eval_folder

    path = results_dir / f"{name}.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    result = eval_folder(folder, recipe.classifier_dir(), per_category, results_dir / name)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def checkpoint_row(recipe: Any, name: str, spec: str, results_dir: Path, per_category: int) -> dict[str, Any]:
    from training_tools.recipes import emoji_eval

    path = results_dir / f"{name}.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    folder, steps, guidance = [*spec.split(":"), "28", "1"][:3]
    started = time.monotonic()
    with emoji_eval.checkpoint_folder(Path(folder)) as final:
        generate = emoji_eval.checkpoint_generator(
            final, int(steps), float(guidance), threads=recipe.cfg.threads
        )
        report = emoji_eval.run_eval(generate, recipe.classifier_dir(), per_category, results_dir / name)
    result = {
        **report,
        "checkpoint": folder,
        "steps": int(steps),
        "guidance": float(guidance),
        "seconds": round(time.monotonic() - started, 1),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a recipe run folder (with recipe.json)")
    p.add_argument("--per-category", type=int, default=200)
    p.add_argument(
        "--only", default="", help="comma-separated row names (default: every row the run can make)"
    )
    p.add_argument("--folder", action="append", default=[], metavar="NAME=DIR", help="also a bundle folder")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=DIR:STEPS:GUIDANCE",
        help="also a training checkpoint (final/ or checkpoints/step-N/) at these steps and guidance",
    )
    p.add_argument("--json", type=Path, help="write the table here too")
    args = p.parse_args(argv)

    from training_tools.recipes.emoji_default import Recipe, RecipeConfig

    cfg = RecipeConfig.from_dict(json.loads((args.run / "recipe.json").read_text())).replace(
        out=str(args.run)
    )
    recipe = Recipe(cfg)
    results_dir = args.run / f"eval-{args.per_category}"
    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - {name for name, _ in recipe.eval_plan()}
    if unknown:
        p.error(f"no such row: {', '.join(sorted(unknown))} (rows: {[n for n, _ in recipe.eval_plan()]})")
    rows = recipe.evaluate(results_dir, args.per_category, only)
    for item in args.folder:
        name, sep, folder = item.partition("=")
        if not sep:
            p.error(f"--folder {item!r} is not NAME=DIR")
        rows[name] = folder_row(recipe, name, Path(folder), results_dir, args.per_category)
    for item in args.checkpoint:
        name, sep, spec = item.partition("=")
        if not sep:
            p.error(f"--checkpoint {item!r} is not NAME=DIR:STEPS:GUIDANCE")
        rows[name] = checkpoint_row(recipe, name, spec, results_dir, args.per_category)
    for name, row in rows.items():
        cats = " ".join(f"{k} {100 * v:.1f}" for k, v in row["per_category"].items())
        print(f"{name:48s} overall {100 * row['overall']:5.1f}  {cats}")
    if args.json:
        table = {"run": str(args.run), "per_category": args.per_category, "rows": rows}
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
