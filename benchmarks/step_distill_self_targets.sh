#!/bin/bash
# Step distillation's target model, two arms from one KD student (session 21, docs/training.md):
#   "teacher" (the recipe's default): the frozen teacher's guided 8-step trajectories;
#   "student": the KD student itself under CFG (`--step-distill-targets-from student`), the way
#   session 20's pilot distilled a model into itself and kept its 4-step CFG quality.
# Both arms run the recipe's own step-distillation stage as it ships: its minutes (20), threads (2),
# one after the other. The "teacher" arm goes on in RUN itself; the "student" arm in a copy whose
# stages are hard links of RUN's.
#
#   benchmarks/step_distill_self_targets.sh [RUN]
#
# RUN (default runs/emoji-v12) must have finished the recipe up to its KD student
# (`--stages dataset,autoencoder,teacher,distill`). Results: RUN-targets.json (EmojiEval, 200 prompts
# per category: both arms, the KD student at 4 steps with and without CFG, teacher and KD student at
# 28 steps). About 40 min of training and 15 of evals on 2 cores (session 21: 14).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${1:-runs/emoji-v12}
S="$R-sd-student"

test -f "$R/distill/final/model_index.json" || { echo "$R has no KD student yet" >&2; exit 1; }
# Hard links of RUN's finished stages, its recipe with the student's own targets.
[ -d "$S" ] || $PY benchmarks/copy_run.py "$R" "$S" --without step_distill --set step_distill_targets_from=student
$PY -m training_tools.recipes.emoji_default --config "$S/arm.json" --stages step_distill
$PY -m training_tools.recipes.emoji_default --out "$R" --stages step_distill

$PY benchmarks/emoji_eval_table.py "$S" --per-category 200 --only student_step_distilled_4 \
    --json "$S-table.json"
$PY benchmarks/emoji_eval_table.py "$R" --per-category 200 \
    --only student_step_distilled_4,student_distilled_4_before_step_distill_cfg,student_distilled_4_before_step_distill,teacher_28,student_distilled_28 \
    --json "$R-table.json"
$PY - "$R" "$S" <<'PY'
import json, sys
run, copy = sys.argv[1:]
table = json.load(open(f"{run}-table.json"))
arm = json.load(open(f"{copy}-table.json"))["rows"]["student_step_distilled_4"]
table["rows"]["student_step_distilled_4_targets_from_student"] = {**arm, "run": copy}
json.dump(table, open(f"{run}-targets.json", "w"), indent=1)
PY
