"""The paper's ablation for a KD student that already exists (the shipped one, whose run folder is
gone): the same student trained without the teacher for the same number of samples, in a recipe run
folder that EmojiEval can score. A recipe run does the same itself with ``--ablation --ablation-match
samples``.

    .venv/bin/python benchmarks/no_kd_twin.py --out runs/abl --steps 4582 \
        [--autoencoder model_store/builtin/snapgen-emoji/checkpoint/autoencoder] [--cooldown 0.1] [--prepare-only]
    .venv/bin/python benchmarks/emoji_eval_table.py runs/abl --per-category 200 --only student_no_kd_28

``--steps`` is the KD student's optimizer steps (the shipped one: 4,582 at batch 64 = 293k samples);
matching samples rather than minutes keeps the comparison the same on any CPU. The run folder gets the
recipe's dataset (its defaults, seed 0), the given autoencoder saved in fp32 as the run's
``autoencoder/final`` (the KD student's own, so both read the same latents), the recipe's fresh text
projections (``text-init``), ``configs/ablation.json`` (the recipe's no-KD student config with
``max_steps`` = ``--steps`` and a cooldown over the last ``--cooldown`` of them) and ``recipe.json``
(the default recipe with ``ablation`` on, for ``emoji_eval_table.py``; a folder that has one goes on
with it). Then it trains that stage with
the recipe's own launcher (logs under ``OUT/logs``, the stage's entry in ``summary.json``); stop it with
Ctrl-C or SIGTERM (a checkpoint is written) and run the same command again to resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from training_tools.recipes.emoji_default import RecipeConfig


def prepare(cfg: RecipeConfig, steps: int, cooldown: float, autoencoder: Path) -> Path:
    """Write the run folder of ``cfg`` (the KD student's recipe; ``ablation`` is switched on);
    returns the ablation stage's config path."""
    import torch

    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from training_tools.recipes.emoji_default import Recipe, cooldown_start

    cfg = cfg.replace(ablation=True)
    recipe = Recipe(cfg)
    out = recipe.out
    (out / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    recipe.stage_dataset()
    final = recipe.final("autoencoder")
    if not (final / "metrics.json").is_file():
        model = SnapGenAutoencoder.from_pretrained(
            str(autoencoder), use_safetensors=True, torch_dtype=torch.float32
        )
        model.save_pretrained(final, safe_serialization=True)
        note = {"note": f"{autoencoder} saved in fp32 (not trained in this run)"}
        (final / "metrics.json").write_text(json.dumps(note) + "\n")
    train = recipe.train_config(
        "ablation",
        stage="pretrain",
        model={"text_path": str(recipe.text_init())},
        max_steps=steps,
        optim={"decay_from": cooldown_start(steps, cooldown)},
    )
    path = out / "configs" / "ablation.json"
    if not path.is_file():  # a resumed run keeps the config it started with
        path.write_text(json.dumps(train, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder (resumed when it exists)")
    p.add_argument("--steps", type=int, required=True, help="the KD student's optimizer steps")
    p.add_argument("--cooldown", type=float, default=0.1, help="fraction of the steps with a decaying lr")
    p.add_argument(
        "--autoencoder",
        type=Path,
        default=ROOT / "model_store/builtin/snapgen-emoji/checkpoint/autoencoder",
        help="the KD student's autoencoder (diffusers layout)",
    )
    p.add_argument("--prepare-only", action="store_true", help="write the run folder, do not train")
    args = p.parse_args(argv)
    if args.steps < 1 or not 0.0 <= args.cooldown < 1.0:
        p.error("--steps must be >= 1 and --cooldown in [0, 1)")
    from training_tools.recipes.emoji_default import RecipeConfig, console_exit, console_recipe

    saved = args.out / "recipe.json"  # a run folder goes on with the recipe it was prepared with
    if saved.is_file():
        cfg = RecipeConfig.from_dict(json.loads(saved.read_text())).replace(out=str(args.out))
    else:
        cfg = RecipeConfig(out=str(args.out), ablation=True)

    def work() -> int | None:
        config = prepare(cfg, args.steps, args.cooldown, args.autoencoder)
        print(f"config: {config}")
        if args.prepare_only:
            return None
        # The recipe's own trainer launch: resume, divergence retries, stage clock, summary.json entry;
        # SIGTERM / Ctrl-C stop it with a checkpoint (run the same command again to resume).
        console_recipe(cfg).run_trainer("ablation", json.loads(config.read_text()), None)
        return None

    return console_exit("no_kd_twin", work)


if __name__ == "__main__":
    raise SystemExit(main())
