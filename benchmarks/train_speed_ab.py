"""Training speed of this checkout against another git revision, side by side, alternating.

    .venv/bin/python benchmarks/train_speed_ab.py STAGE CONFIG.json [--against HEAD | --ranks N]
        [--rounds 4] [--steps 50] [--skip 20] [--json OUT]

Runs ``python -m training_tools STAGE CONFIG`` (``max_steps`` = ``--steps``, no checkpoints, a
throw-away run folder) in a worktree of ``--against`` and in this checkout, one after the other,
``--rounds`` times, and prints each run's mean samples/s over the steps after ``--skip`` and the
paired ratio new / old per round. With ``--ranks N`` both arms are this checkout: "old" is the
config as it is (one process), "new" the same run as N ranks under ``accelerate launch``, each with
``batch_size`` / N samples and ``cpu_threads`` / N threads (the recipe's ``processes``). This
machine's speed drifts by 10-25 % over minutes, so only runs next to each other are compared. Relative paths in the config resolve against this checkout. Nothing else should run meanwhile (two torch jobs on two
cores slow each other about 10x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training_tools.recipes.emoji_default import rank_launcher  # noqa: E402


def samples_per_s(events: Path, skip: int) -> float:
    rows = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    speeds = [r["data"]["samples_per_s"] for r in rows if r["kind"] == "progress" and r["step"] > skip]
    if not speeds:
        raise SystemExit(f"{events}: no progress after step {skip}; give more --steps")
    return statistics.fmean(speeds)


def run_once(
    checkout: Path, stage: str, config: dict, work: Path, name: str, skip: int, ranks: int = 1
) -> float:
    run_dir = work / name
    cfg = dict(config, run_dir=str(run_dir), checkpoint_every=0)
    threads = max(1, int(cfg.get("cpu_threads") or os.cpu_count() or 1) // ranks)
    if ranks > 1:
        cfg.update(batch_size=int(cfg["batch_size"]) // ranks, cpu_threads=threads)
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    # -P: the working directory (this checkout, where the config's relative paths point) is not put
    # on sys.path, so PYTHONPATH alone picks which checkout's code runs.
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(threads))
    launch = [sys.executable, "-P"] if ranks == 1 else rank_launcher(ranks)
    done = subprocess.run(
        [*launch, "-m", "training_tools", stage, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    speed = samples_per_s(run_dir / "events.jsonl", skip)
    shutil.rmtree(run_dir)
    return speed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage")
    p.add_argument("config")
    p.add_argument("--against", default="HEAD", help="git revision to compare with (default HEAD)")
    p.add_argument(
        "--ranks", type=int, default=1, help="compare one process with N ranks of this checkout instead"
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip", type=int, default=20, help="steps of warm-up left out of the mean")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    config = json.loads(Path(args.config).read_text())
    config["max_steps"] = args.steps
    config.setdefault("optim", {})["decay_from"] = 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-ab-") as tmp:
        work = Path(tmp)
        old = ROOT if args.ranks > 1 else work / "checkout-old"
        if old != ROOT:
            subprocess.run(
                ["git", "worktree", "add", "-q", "--detach", str(old), args.against], cwd=ROOT, check=True
            )
        try:
            for n in range(1, args.rounds + 1):
                a = run_once(old, args.stage, config, work, "old", args.skip)
                b = run_once(ROOT, args.stage, config, work, "new", args.skip, ranks=args.ranks)
                rows.append({"round": n, "old": round(a, 2), "new": round(b, 2), "ratio": round(b / a, 3)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if old != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    ratios = [r["ratio"] for r in rows]
    summary = {
        "stage": args.stage,
        "config": args.config,
        "against": f"{args.ranks} ranks of this checkout" if args.ranks > 1 else args.against,
        "steps": args.steps,
        "skip": args.skip,
        "rounds": rows,
        "median_ratio": statistics.median(ratios),
        "rounds_faster": sum(r > 1.0 for r in ratios),
    }
    print(
        f"new / old samples/s: median {summary['median_ratio']:.3f} over {len(rows)} rounds "
        f"({summary['rounds_faster']} faster)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
