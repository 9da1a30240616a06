"""Showcase images and timings of the shipped built-in model, made with the real ``snapgen`` CLI.

``python -m training_tools.recipes.showcase [--out-dir docs/images] [--measured runs/emoji-default/measured.json]``

Runs ``snapgen generate PROMPT -o docs/images/emoji-NN-slug.png --seed S --json`` for each prompt of
:data:`PROMPTS` (offline: the built-in model) and records the wall time of each command, and the
per-image time of a batch of 8 generated in one command (start-up excluded by difference), in the
measured-numbers file the model card reads.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPTS: tuple[str, ...] = (
    "a red apple on a yellow background",  # the README's example; "apple" is not one of the 200 classes
    "a pizza on a blue background",
    "a dog on a green background",
    "a unicorn on a white background",
    "a shark on a yellow background",
    "a sailboat on a pink background",
    "a ghost on a black background",
    "two bananas on a blue background",
    "three mushrooms on a white background",
    "a dog to the left of an airplane on a yellow background",
    "a sun above a dolphin on a blue background",
    "a pizza, a crown and a zebra in a row on a green background",
)


def _snapgen() -> str:
    local = Path(sys.executable).with_name("snapgen")
    return str(local) if local.exists() else (shutil.which("snapgen") or "snapgen")


def slug(text: str) -> str:
    """'a dog on a green background' -> 'a-dog-on-a-green-background' (at most 48 characters)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].rstrip("-")


def run_generate(args: list[str]) -> tuple[float, str]:
    """Run ``snapgen generate ARGS``; (wall seconds, stdout). Raises on a non-zero exit."""
    started = time.perf_counter()
    proc = subprocess.run([_snapgen(), "generate", *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"snapgen generate {args} failed: {proc.stderr.strip()[-400:]}")
    return seconds, proc.stdout


def main(argv: list[str] | None = None) -> int:
    """Write the showcase PNGs and the timings; returns 0."""
    p = argparse.ArgumentParser(
        prog="python -m training_tools.recipes.showcase", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--out-dir", default="docs/images")
    p.add_argument("--measured", default="runs/emoji-default/measured.json")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    walls = []
    files = []
    for index, prompt in enumerate(PROMPTS):
        path = out / f"emoji-{index + 1:02d}-{slug(prompt)}.png"
        seconds, _ = run_generate([prompt, "-o", str(path), "--seed", str(args.seed)])
        walls.append(seconds)
        files.append(str(path))
        print(f"{seconds:.2f} s  {path}", flush=True)
    tmp = Path(args.measured).with_suffix(".batch")
    tmp.mkdir(parents=True, exist_ok=True)
    one, _ = run_generate([PROMPTS[0], "-o", str(tmp / "one.png"), "--seed", "1"])
    eight, _ = run_generate([PROMPTS[0], "-o", str(tmp / "b.png"), "--seed", "1", "--num-images", "9"])
    per_image = max(0.0, (eight - one) / 8)
    shutil.rmtree(tmp, ignore_errors=True)
    measured_path = Path(args.measured)
    measured = json.loads(measured_path.read_text()) if measured_path.is_file() else {}
    measured["generate"] = {
        "precision": "int8",
        "cli_wall_seconds": round(sorted(walls)[len(walls) // 2], 2),
        "cli_wall_seconds_all": [round(w, 2) for w in walls],
        "seconds_per_image": round(per_image, 3),
        "how": "median wall time of one `snapgen generate` command (includes Python start-up and model "
        "loading); per image = (9 images - 1 image) / 8 in one command",
        "files": files,
    }
    measured_path.write_text(json.dumps(measured, indent=2) + "\n")
    print(json.dumps(measured["generate"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
