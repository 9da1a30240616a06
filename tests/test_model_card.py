"""The built-in model's card: sizes from the run's presets, the eval table, the issue's verdicts."""

from __future__ import annotations

import json
from pathlib import Path

from training_tools.recipes import model_card


def _result(overall: float, single: float) -> dict:
    per = {"single_object": single, "two_object": 0.0, "counting": 0.1, "background": 1.0, "position": 0.0}
    return {"overall": overall, "per_category": per, "frechet_distance": 6.5, "num_images": 400}


def test_sizes_come_from_the_presets_the_run_used() -> None:
    from snapgen_app.model.presets import unet_preset
    from snapgen_app.model.unet import SnapGenUNet

    built = SnapGenUNet.from_unet_config(unet_preset("tiny"))
    assert model_card.preset_parameters("tiny") == sum(p.numel() for p in built.parameters())
    assert model_card.preset_parameters("tiny-emoji-small") == 6_343_024  # with the pooled-text input
    assert model_card.preset_parameters("tiny-emoji-student") > model_card.preset_parameters(
        "tiny-emoji-small"
    )
    table = model_card.eval_table({"teacher_28": _result(0.4, 0.6)}, {"teacher": "8.9 M", "student": "6.2 M"})
    assert "| teacher (8.9 M), 28 steps, CFG |" in table
    assert "| student (6.2 M) with multi-level KD, 28 steps, CFG | not run" in table
    assert "**40.0**" in table


def test_verdicts_follow_the_numbers() -> None:
    results = {
        "teacher_28": _result(0.40, 0.70),
        "student_distilled_28": _result(0.36, 0.60),
        "student_no_kd_28": _result(0.30, 0.50),
        "bundle_fp32_4": _result(0.37, 0.86),
        "bundle_int8_4": _result(0.36, 0.86),
        "bundle_int8_4_cfg": _result(0.35, 0.80),
    }
    lines = "\n".join(model_card.targets(results))
    assert "36.0 vs 30.0 % -> **met**" in lines  # KD beats no KD
    assert "36.0 / 40.0 = 90 % -> **met**" in lines  # shipped = the better int8 row (no CFG)
    assert "(1.0 points) -> **met**" in lines
    assert "at 4 steps >= 85 %: 86.0 % -> **met**" in lines
    results["bundle_int8_4"] = _result(0.33, 0.84)
    lines = "\n".join(model_card.targets(results))
    assert "35.0 / 40.0 = 88 % -> **NOT met**" in lines  # now the CFG row is shipped
    assert "80.0 % -> **NOT met**" in lines
    assert "(4.0 points) -> **NOT met**" in lines
    # Once the shipped folder itself was scored (its text encoder differs from the run's bundle),
    # the 4-step verdicts judge that row, and the table shows it.
    results["shipped_int8"] = _result(0.34, 0.75)
    lines = "\n".join(model_card.targets(results))
    assert "34.0 / 40.0 = 85 % -> **NOT met**" in lines
    assert "at 4 steps >= 85 %: 75.0 % -> **NOT met**" in lines
    assert (
        "| **as shipped**: int8, text encoder with int8 word embeddings (training vocabulary exact)"
        in model_card.eval_table(results)
    )


def test_stage_budgets_include_a_runs_stage_overrides() -> None:
    """The card states each stage's minutes: a run with ``--stage-minutes step_distill=75`` trained
    for 217 min, not the 162 its ``budget_minutes`` says (the card once printed the budget alone)."""
    from training_tools.recipes.emoji_default import RecipeConfig

    default = model_card.stage_budgets(RecipeConfig())
    assert default == {"autoencoder": 10.0, "teacher": 66.0, "distill": 66.0, "step_distill": 20.0}
    assert sum(default.values()) == RecipeConfig().budget_minutes
    longer = model_card.stage_budgets(RecipeConfig(stage_minutes={"step_distill": 75.0}))
    assert longer["step_distill"] == 75.0 and sum(longer.values()) == 217.0
    # A stage run for --stage-steps took the minutes its summary says (none before it ran).
    stepped = RecipeConfig(stage_steps={"teacher": 7300})
    assert model_card.stage_budgets(stepped, {"teacher": {"minutes": 141.23}})["teacher"] == 141.2
    assert model_card.stage_budgets(stepped)["teacher"] == 0.0


def test_the_schedule_sentence_says_where_the_ablation_ran() -> None:
    from training_tools.recipes.emoji_default import RecipeConfig

    assert "not part of this run (`--ablation` adds it" in model_card.schedule(RecipeConfig())
    after = model_card.schedule(RecipeConfig(ablation=True))
    assert "runs after the distilled one, for the same wall time and threads" in after
    samples = model_card.schedule(RecipeConfig(ablation=True, ablation_match="samples"))
    assert "runs after the distilled one, for the same samples (its steps at the same batch)" in samples
    beside = model_card.schedule(RecipeConfig(ablation=True, parallel=True))
    assert "run side by side, 1 thread(s) each" in beside
    assert "(2 torch threads); " in after
    assert "(2 torch threads; the teacher as 2 processes of 1 each)" in model_card.schedule(
        RecipeConfig(ablation=True, parallel=True, processes=2)
    )
    ranked = "(2 torch threads; the teacher and the distilled student as 2 processes of 1 each)"
    assert ranked in model_card.schedule(RecipeConfig(processes=2))


def test_the_targets_are_judged_on_the_largest_eval_set_that_has_the_teacher_and_the_shipped_model(
    tmp_path: Path,
) -> None:
    """`benchmarks/emoji_eval_table.py` writes RUN/eval-N/ROW.json; the card shows those rows in a
    second table and judges the issue's targets on them once the teacher's and the shipped rows are
    there (80 prompts per category move a category 1.25 points per prompt)."""
    assert model_card.larger_eval(tmp_path, 80) == (80, {})
    for n, rows in {
        200: {"teacher_28": _result(0.40, 0.7)},
        120: {"x": _result(0.1, 0.1)},
        50: {"y": _result(0.2, 0.2)},
    }.items():
        (tmp_path / f"eval-{n}").mkdir()
        for name, row in rows.items():
            (tmp_path / f"eval-{n}" / f"{name}.json").write_text(json.dumps(row))
    (tmp_path / "eval-300").mkdir()  # an empty folder (a run still going) is no set
    n, more = model_card.larger_eval(tmp_path, 80)
    assert n == 200 and set(more) == {"teacher_28"}
    recipe_rows = {"teacher_28": _result(0.43, 0.79), "shipped_int8": _result(0.37, 0.61)}
    assert model_card.judged(recipe_rows, more) is recipe_rows  # no shipped row at 200 yet
    more["shipped_int8"] = _result(0.383, 0.64)
    assert model_card.judged(recipe_rows, more) is more
    assert "38.3 / 40.0 = 96 % -> **met**" in "\n".join(model_card.targets(more))
    table = model_card.eval_table(more, skip_missing=True)
    assert "not run" not in table and table.count("\n") == 4  # header, rule, two rows
    # A shipped row at 200 counts only when it scored the files and defaults this ship scored at 80:
    # one left from an earlier ship (other weights) is stale.
    this_ship = {
        **_result(0.37, 0.61),
        "files_sha256": {"unet.int8.onnx": "a" * 64},
        "steps": 4,
        "guidance": 1.0,
    }
    (tmp_path / "eval-200" / "shipped_int8.json").write_text(json.dumps({**this_ship, "overall": 0.383}))
    assert model_card.larger_eval(tmp_path, 80, this_ship)[1]["shipped_int8"]["overall"] == 0.383
    earlier = {**this_ship, "files_sha256": {"unet.int8.onnx": "b" * 64}}
    assert "shipped_int8" not in model_card.larger_eval(tmp_path, 80, earlier)[1]
    assert "shipped_int8" not in model_card.larger_eval(tmp_path, 80, None)[1]
