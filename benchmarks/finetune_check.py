"""What a fine-tune does to the built-in model: the style it learns and what it keeps.

The distillation wizard's path on the real built-in model (not the tests' tiny random one): eight
renders of the red-apple emoji turned into blue-tinted greyscale, captioned "a red apple in zorp
style", a LoRA fine-tune of ``--model``, ``snapgen export`` int8, then side by side for the base
bundle and the fine-tuned one:

- style: mean |generated - mean training picture| (0-255) of the caption's images, 4 seeds;
- drift: mean |fine-tuned - base| (0-255) on four prompts the pictures say nothing about;
- EmojiEval (``--per-category`` prompts per category) of both, at the bundles' own defaults. The
  built-in model has classifier-free guidance baked in by step distillation (it samples at
  guidance 1) while LoRA trains on the plain flow-matching loss; this row shows how much of the
  base's prompt following survives.

Needs the train extra and the emoji font. About 2 min on a 2-core CPU at the defaults.

    .venv/bin/python benchmarks/finetune_check.py [--model snapgen-emoji] [--steps 150] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from training_tools.emoji_world.eval import GenerateFn

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a red apple in zorp style"
UNRELATED = ("a dog", "a pizza on a green background", "two bananas", "a ghost to the left of a rocket")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="snapgen-emoji", help="base model (registered name)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--per-category", type=int, default=40, help="EmojiEval prompts per category")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def style_pictures(folder: Path, classifier: Path, count: int = 8, seed: int = 0) -> np.ndarray:
    """``count`` renders of the red apple in blue-tinted greyscale with the caption; their mean."""
    from PIL import Image

    from training_tools.emoji_world.compose import SceneRequest, allowed_backgrounds, render_scene
    from training_tools.emoji_world.eval import load_classifier

    _, classes = load_classifier(classifier)
    apple = next(i for i, c in enumerate(classes) if c.name == "red apple")
    backgrounds = allowed_backgrounds(classes, [apple])
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    pictures = []
    for index in range(count):
        request = SceneRequest("single", (apple,), backgrounds[index % len(backgrounds)])
        image, _ = render_scene(request, classes, rng)
        grey = Image.fromarray(image).convert("L")
        styled = Image.merge("RGB", (grey, grey, grey.point(lambda v: min(255, int(v * 1.3) + 40))))
        styled.save(folder / f"picture_{index}.png")
        (folder / f"picture_{index}.txt").write_text(CAPTION)
        pictures.append(np.asarray(styled, dtype=np.float32))
    return np.mean(pictures, axis=0)


def generator_of(bundle: Path) -> GenerateFn:
    """The bundle's int8 generation at its own default steps and guidance (one set of sessions)."""
    from model_store.bundle import read_manifest
    from training_tools.recipes.emoji_eval import bundle_generator

    defaults = read_manifest(bundle).defaults
    return bundle_generator(bundle, "int8", defaults.steps, defaults.guidance_scale)


def images_of(generate: GenerateFn, prompts: tuple[str, ...], seeds: tuple[int, ...]) -> np.ndarray:
    """[prompts, seeds, 128, 128, 3] float images."""
    return np.stack([np.stack(generate([p] * len(seeds), list(seeds))).astype(np.float32) for p in prompts])


def emoji_eval(generate: GenerateFn, classifier: Path, per_category: int) -> dict:
    """EmojiEval in percent: overall and per category (no Frechet distance)."""
    from training_tools.recipes.emoji_eval import run_eval

    report = run_eval(generate, classifier, per_category, with_frechet=False)
    return {"overall": round(100 * report["overall"], 2)} | {
        k: round(100 * v, 2) for k, v in report["per_category"].items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="snapgen-finetune-check-"))
    os.environ["SNAPGEN_HOME"] = str(work / "home")  # the run folder; built-in models stay visible
    sys.path.insert(0, str(ROOT))
    report = check(args, work)  # on a failure the folder stays, with the run's log
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


def check(args: argparse.Namespace, work: Path) -> dict:
    """Fine-tune, export and compare; the report."""
    from model_store.registry import Registry
    from snapgen_app import finetune

    base = Registry().resolve(args.model).path
    classifier = base / "eval" / "classifier"
    mean_picture = style_pictures(work / "pictures", classifier)
    request = finetune.FineTuneRequest(
        images_dir=str(work / "pictures"),
        base_model=args.model,
        name="zorp",
        steps=args.steps,
        lora_rank=args.lora_rank,
        resolution=128,
        batch_size=4,
        learning_rate=args.learning_rate,
        sample_prompts=(CAPTION,),
        sample_steps=4,
        cpu_threads=2,
    )
    started = time.monotonic()
    handle = finetune.start(request)
    state = handle.wait(3600)
    train_s = time.monotonic() - started
    print(f"fine-tune: {state} in {train_s:.0f} s", flush=True)
    if state != "finished":
        raise SystemExit(f"the fine-tune ended {state}; its log: {handle.run_dir}")
    started = time.monotonic()
    finetune.export_run(handle.run_dir)
    export_s = time.monotonic() - started
    report: dict = {
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "train_s": round(train_s, 1),
        "export_s": round(export_s, 1),
    }
    generators = {"base": generator_of(base), "fine_tuned": generator_of(handle.bundle_dir)}
    for label, generate in generators.items():
        style = images_of(generate, (CAPTION,), (0, 1, 2, 3))[0]
        report[label] = {"style_distance": round(float(np.abs(style - mean_picture).mean()), 1)}
    other = {label: images_of(generate, UNRELATED, (3,)) for label, generate in generators.items()}
    report["drift_on_other_prompts"] = round(float(np.abs(other["fine_tuned"] - other["base"]).mean()), 1)
    for label, generate in generators.items():
        report[label]["emoji_eval"] = emoji_eval(generate, classifier, args.per_category)
        print(f"{label}: {report[label]}", flush=True)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
