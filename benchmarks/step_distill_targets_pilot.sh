#!/bin/bash
# Step distillation's targets, two arms side by side (session 19, docs/training.md):
#   the teacher's 8-step Euler path over each of the 4 student intervals (the recipe's default,
#   teacher_steps_for_targets 8) against its guided velocity at the student's own points
#   (teacher_steps_for_targets 4: guidance distillation on the 4-step trajectory).
# Both arms distil one model into itself: the pilot teacher (the recipe's teacher stage alone) is the
# frozen teacher and the student's starting point. One thread each, the same wall time.
#
#   benchmarks/step_distill_targets_pilot.sh [PILOT_RUN] [TEACHER_MIN] [ARM_MIN]
#
# Defaults: runs/gd-pilot, 55, 30 (about 1 h 50 on 2 cores with the evals). Results:
# runs/gd-sd8.json, runs/gd-sd4.json, runs/gd-base.json (EmojiEval, 200 prompts per category).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
P=${1:-runs/gd-pilot}
TEACHER_MIN=${2:-55}
ARM_MIN=${3:-30}

$PY -m training_tools.recipes.emoji_default --out "$P" --stage-minutes teacher="$TEACHER_MIN" \
    --stages dataset,autoencoder,teacher

for arm in 8 4; do
  d=$(dirname "$P")/gd-sd$arm
  rm -rf "$d"
  $PY benchmarks/copy_run.py "$P" "$d" --without distill --without step_distill \
      --set teacher_steps_for_targets=$arm --set threads=1 \
      --set "stage_minutes={\"step_distill\": $ARM_MIN}"
  mkdir -p "$d/distill"; cp -al "$P/teacher/final" "$d/distill/final"  # the student starts as the teacher
done
for arm in 8 4; do
  d=$(dirname "$P")/gd-sd$arm
  $PY -m training_tools.recipes.emoji_default --config "$d/arm.json" --stages step_distill \
      > "$d/arm.out" 2>&1 &
done
wait

for arm in 8 4; do
  $PY benchmarks/emoji_eval_table.py "$(dirname "$P")/gd-sd$arm" --per-category 200 \
      --only student_step_distilled_4 --json "$(dirname "$P")/gd-sd$arm.json"
done
$PY benchmarks/emoji_eval_table.py "$P" --per-category 200 --only teacher_28 \
    --checkpoint base_4="$P/teacher/final:4:1" --checkpoint base_4_cfg="$P/teacher/final:4:4" \
    --checkpoint base_8_cfg="$P/teacher/final:8:4" --json "$(dirname "$P")/gd-base.json"
