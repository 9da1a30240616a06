"""Copy a recipe run folder for an experiment arm, cheaply and without touching the original.

    python benchmarks/copy_run.py SRC DST [--set KEY=JSON ...] [--without STAGE ...] [--reopen STAGE]

Finished stages are hard links (no extra disk: a stage's files are written once, never in place);
the files a recipe rewrites in place (the cache's ``index.json``, the stage clocks) are real copies.
``DST/arm.json`` is SRC's ``recipe.json`` with ``out`` set to DST and each ``--set`` applied (values
are JSON: ``--set threads=1 --set 'stage_minutes={"teacher": 96}'``); run the arm with
``python -m training_tools.recipes.emoji_default --config DST/arm.json --stages ...``.
``--without STAGE`` leaves a stage (and its clock) out, so the arm trains it afresh. ``summary.json``
keeps SRC's entries of the stages copied as they are.

``--reopen STAGE`` makes a finished training stage train on: a real copy of it without ``final/``,
with its saved config back in the stable phase (no cooldown step) and its paths pointing into DST.
With a larger ``stage_minutes`` for it, the recipe resumes it from its last checkpoint at the
constant learning rate, then cools it down again (session 22: a longer teacher from emoji-v12's).
The stages trained from it (distill, step_distill after a teacher) are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

TRAINED = ("teacher", "distill", "step_distill")  # each trains from the one before
STAGES = ("dataset", "autoencoder", "cache", "text-init", "teacher", "distill", "step_distill", "classifier")


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link, symlinks=True)


def _retarget(path: Path, src: Path, dst: Path) -> None:
    """Point a JSON file's paths under SRC to DST (exact prefix of whole path segments)."""
    text = path.read_text()
    for quote_end in ("/", '"'):
        text = text.replace(f'"{src}{quote_end}', f'"{dst}{quote_end}')
    path.write_text(text)


def retarget_config(path: Path, src: Path, dst: Path, stage: str) -> None:
    """Point a trainer config's paths under SRC to DST; fail if its run_dir is not DST/STAGE."""
    _retarget(path, src, dst)
    run_dir = Path(json.loads(path.read_text())["run_dir"])
    if run_dir.resolve() != (dst / stage).resolve():  # it would train on in SRC
        raise SystemExit(f"{path}: run_dir {run_dir} is not under {dst}; pass SRC as the run names it")


def copy_run(
    src: Path,
    dst: Path,
    overrides: dict[str, object],
    reopen: str | None = None,
    without: tuple[str, ...] = (),
) -> Path:
    if not (src / "recipe.json").is_file():
        raise SystemExit(f"{src} is not a recipe run (no recipe.json)")
    if dst.exists():
        raise SystemExit(f"{dst} exists; choose a new folder")
    dst.mkdir(parents=True)
    if reopen is not None:  # what was trained from the reopened stage is stale: left out
        without = (*without, *TRAINED[TRAINED.index(reopen) + 1 :])
    kept = [s for s in STAGES if (src / s).exists() and s not in without]
    for stage in kept:
        if stage != reopen:
            _link_tree(src / stage, dst / stage)
    if (dst / "cache" / "index.json").exists():
        (dst / "cache" / "index.json").unlink()
        shutil.copy2(src / "cache" / "index.json", dst / "cache" / "index.json")
    (dst / "clock").mkdir()
    for stage in kept:
        if (src / "clock" / f"{stage}.json").is_file():
            shutil.copy2(src / "clock" / f"{stage}.json", dst / "clock" / f"{stage}.json")
    if reopen is not None:
        if not (src / reopen / "final" / "model_index.json").is_file():
            raise SystemExit(f"{src}/{reopen} has not finished; nothing to reopen")
        shutil.copytree(
            src / reopen, dst / reopen, ignore=lambda d, names: ["final"] if d == str(src / reopen) else []
        )
        (dst / "configs").mkdir()
        saved = json.loads((src / "configs" / f"{reopen}.json").read_text())
        saved["optim"]["decay_from"] = 0  # back in the stable phase: the recipe resumes, then cools down
        saved["max_steps"] = 1_000_000  # the recipe's placeholder for a time-budgeted stage
        config = dst / "configs" / f"{reopen}.json"
        config.write_text(json.dumps(saved, indent=2) + "\n")
        for path in (config, dst / reopen / "train_config.json"):
            retarget_config(path, src, dst, reopen)
    _copy_summary(src, dst, [s for s in kept if s != reopen])
    recipe = json.loads((src / "recipe.json").read_text())
    recipe.update(overrides, out=str(dst))
    arm = dst / "arm.json"
    arm.write_text(json.dumps(recipe, indent=1) + "\n")
    return arm


def _copy_summary(src: Path, dst: Path, stages: list[str]) -> None:
    """DST/summary.json with SRC's entries of the stages copied as they are (the model card's stage
    table and autoencoder line read them); a reopened or left-out stage writes its own when it ends."""
    if not (src / "summary.json").is_file():
        return
    summary = json.loads((src / "summary.json").read_text())
    kept = {stage: summary[stage] for stage in stages if stage in summary}
    if kept:
        (dst / "summary.json").write_text(json.dumps(kept, indent=2) + "\n")


def parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=JSON, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[])
    parser.add_argument("--without", choices=STAGES, action="append", default=[])
    parser.add_argument("--reopen", choices=TRAINED)
    args = parser.parse_args()
    print(copy_run(args.src, args.dst, dict(args.overrides), args.reopen, tuple(args.without)))


if __name__ == "__main__":
    main()
