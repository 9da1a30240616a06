"""Train a finished training stage of a recipe run again with changed trainer settings, for exactly
the steps it took: a side-by-side arm whose only difference is the change.

    .venv/bin/python benchmarks/retrain_stage.py SRC DST --stage distill --set kd.scaling=kd_only \
        [--set kd.feature_weight=0.5] [--prepare-only]
    .venv/bin/python benchmarks/emoji_eval_table.py DST --per-category 200 --only student_distilled_28

DST is a copy of SRC (``benchmarks/copy_run.py``: finished stages hard-linked) without STAGE and the
stages trained from it. STAGE's config is SRC's as the stage ended (``configs/STAGE.json``: its seed,
so the same batches, noise and timesteps; its batch; its cooldown start ``optim.decay_from``) with
``max_steps`` the steps SRC's stage took, its paths pointed into DST, and each ``--set`` applied
(a dotted TrainConfig key and a JSON value; a bare word is a string). A time-budgeted stage of the
recipe ends where the machine's speed put it, so matching its steps (samples) rather than its minutes
keeps the comparison the same on any CPU and under any load.

It trains through the recipe's own launcher (``Recipe.run_trainer``: logs under ``DST/logs``, the
stage's entry in ``DST/summary.json``, divergence retries); stop it with Ctrl-C or SIGTERM (a
checkpoint is written) and run the same command again to resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from copy_run import TRAINED, copy_run, parse_override, retarget_config  # noqa: E402


def set_dotted(config: dict[str, Any], key: str, value: object) -> None:
    """``config[a][b] = value`` for ``key`` "a.b" (creating the sections on the way)."""
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {key}: {section} is not a section of the config")
    node[leaf] = value


def prepare(src: Path, dst: Path, stage: str, overrides: dict[str, object]) -> Path:
    """Write DST (once; a DST that exists keeps its config, to resume) and return STAGE's config path."""
    from training_tools.config import TrainConfig
    from training_tools.recipes.emoji_default import stage_info

    config = dst / "configs" / f"{stage}.json"
    if config.is_file():
        return config
    if not (src / stage / "final" / "model_index.json").is_file():
        raise SystemExit(f"{src}/{stage} has not finished; nothing to match")
    saved = json.loads((src / "configs" / f"{stage}.json").read_text())
    steps = stage_info(src / stage)["steps"]  # the recipe set max_steps to where the stage ended
    if saved["max_steps"] != steps or saved.get("optim", {}).get("decay_from", 0) >= steps:
        raise SystemExit(f"{src}/configs/{stage}.json does not describe the {steps} steps {stage} took")
    for key, value in overrides.items():
        set_dotted(saved, key, value)
    TrainConfig.from_dict(saved)  # a bad --set fails here, before anything is copied
    copy_run(src, dst, {}, without=tuple(TRAINED[TRAINED.index(stage) :]))
    (dst / "configs").mkdir(exist_ok=True)
    config.write_text(json.dumps(saved, indent=2) + "\n")
    retarget_config(config, src, dst, stage)
    (dst / "recipe.json").write_text((dst / "arm.json").read_text())  # for emoji_eval_table.py
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="a recipe run folder whose STAGE has finished")
    p.add_argument("dst", type=Path, help="the arm's run folder (resumed when it exists)")
    p.add_argument("--stage", choices=TRAINED, required=True)
    p.add_argument(
        "--set", dest="overrides", type=parse_override, action="append", default=[], metavar="KEY=JSON"
    )
    p.add_argument("--prepare-only", action="store_true", help="write the run folder, do not train")
    args = p.parse_args(argv)

    from training_tools.recipes.emoji_default import RecipeConfig, console_exit, console_recipe

    def work() -> int | None:
        config = prepare(args.src, args.dst, args.stage, dict(args.overrides))
        print(f"config: {config}")
        if args.prepare_only:
            return None
        saved = json.loads((args.dst / "recipe.json").read_text())
        recipe = console_recipe(RecipeConfig.from_dict(saved).replace(out=str(args.dst)))
        recipe.run_trainer(args.stage, json.loads(config.read_text()), None)
        return None

    return console_exit("retrain_stage", work)


if __name__ == "__main__":
    raise SystemExit(main())
