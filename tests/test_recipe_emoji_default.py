"""A tiny real run of the emoji_default recipe: stages chain, finished stages are skipped, a stage
stopped on its time budget is finalised from its checkpoint, and a resumed run trains nothing again.

Tiny presets (UNet ``tiny``, autoencoder ``tiny``), a dozen 128 px images, budgets of seconds. The
trainer stages run as real ``python -m training_tools`` subprocesses.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapgen_app.errors import SnapGenError
from training_tools.emoji_world.curation import curate
from training_tools.emoji_world.dataset_builder import BuildConfig, build
from training_tools.recipes.emoji_default import (
    Recipe,
    RecipeConfig,
    _last_event,
    config_from_args,
    cooldown_start,
    make_subset,
    stage_info,
)

ROOT = Path(__file__).resolve().parents[1]


def _config(out: Path) -> RecipeConfig:
    return RecipeConfig(
        out=str(out),
        budget_minutes=1.0,
        stage_minutes={"autoencoder": 0.02, "teacher": 0.05, "distill": 0.05, "step_distill": 0.05},
        teacher_preset="tiny",
        student_preset="tiny",
        autoencoder_preset="tiny",
        num_images=12,
        num_classes=8,
        class_seed=3,
        autoencoder_max_images=8,
        batch_size=2,
        checkpoint_every=2,
        threads=1,
        warmup_steps=1,
        ablation=False,
        teacher_steps_for_targets=4,
        flow_shift=2.0,
        step_distill_guidance=3.0,
    )


def _copy_stages(recipe: Recipe, dest: Path, parts: tuple[str, ...]) -> None:
    """Copy the finished parts of the module's recipe run into a new run folder (real copies)."""
    import shutil

    for part in parts:
        if (recipe.out / part).exists():
            shutil.copytree(recipe.out / part, dest / part, symlinks=True)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, list[str]]:
    out = tmp_path_factory.mktemp("recipe")
    cfg = _config(out)
    # The dataset is built in-process with a small class list (curation renders every candidate once).
    build(
        out / "dataset",
        BuildConfig(num_images=cfg.num_images, seed=0, num_classes=8, class_seed=3),
        classes=curate(8, seed=3),
    )
    lines: list[str] = []
    recipe = Recipe(cfg, log=lines.append)
    recipe.run(["dataset", "autoencoder", "teacher", "distill", "step_distill"])
    return recipe, lines


def test_a_stage_without_cooldown_is_finalised_at_the_step_it_reached(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    recipe, _ = recipe_run

    _copy_stages(recipe, tmp_path, ("dataset", "autoencoder", "text-init"))
    lines: list[str] = []
    cfg = recipe.cfg.replace(out=str(tmp_path), cooldown_fraction=0.0)
    Recipe(cfg, log=lines.append).run(["dataset", "autoencoder", "teacher"])
    assert any("teacher: finalising at step" in line for line in lines)
    assert not any("cooldown" in line for line in lines)
    saved = json.loads((tmp_path / "configs" / "teacher.json").read_text())
    assert saved["optim"].get("decay_from", 0) == 0


def test_a_dataset_built_with_other_settings_is_refused(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """Settings given on a resumed run that the dataset in its folder was not built with: one error
    naming them, not a model card printing the new settings over the old images."""
    from training_tools.recipes.emoji_default import RecipeError

    recipe, _ = recipe_run
    _copy_stages(recipe, tmp_path, ("dataset",))
    with pytest.raises(RecipeError, match=r"was built with num_images 12 \(asked: 13\), seed 0 \(asked: 1\)"):
        Recipe(recipe.cfg.replace(out=str(tmp_path), num_images=13, seed=1)).run(["dataset"])
    lines: list[str] = []
    Recipe(recipe.cfg.replace(out=str(tmp_path)), log=lines.append).run(["dataset"])
    assert any(line.endswith("dataset: present, skipped") for line in lines)


def test_a_diverging_stage_goes_on_with_the_next_seed_a_bounded_number_of_times(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """A teacher whose loss blows up (here: an absurd learning rate, so every try diverges) is
    resumed from its last healthy checkpoint with the next seed, DIVERGENCE_RETRIES times, then the
    recipe stops with the stage's error instead of training on a dead network."""

    from training_tools.recipes.emoji_default import DIVERGENCE_RETRIES, RecipeError

    recipe, _ = recipe_run
    _copy_stages(recipe, tmp_path, ("dataset", "autoencoder", "text-init"))
    lines: list[str] = []
    cfg = recipe.cfg.replace(out=str(tmp_path), teacher_lr=1e30, stage_minutes={"teacher": 5.0})
    with pytest.raises(RecipeError, match="stage teacher failed"):
        Recipe(cfg, log=lines.append).run(["dataset", "autoencoder", "teacher"])
    retries = [line for line in lines if "going on from its last healthy checkpoint" in line]
    assert len(retries) == DIVERGENCE_RETRIES == 2
    assert all("teacher: training diverged" in line for line in retries)
    assert retries[0].endswith("seed 1") and retries[1].endswith("seed 2")
    assert json.loads((tmp_path / "configs" / "teacher.json").read_text())["seed"] == 2
    assert not (tmp_path / "teacher" / "final").exists()

    # The same command again resumes with the seed the stage was going on with, not the recipe's
    # (which would replay the steps that blew up from the same checkpoint).
    lines.clear()
    with pytest.raises(RecipeError, match="stage teacher failed"):
        Recipe(cfg, log=lines.append).run(["dataset", "autoencoder", "teacher"])
    retries = [line for line in lines if "going on from its last healthy checkpoint" in line]
    assert retries[0].endswith("seed 3") and retries[1].endswith("seed 4")


def test_stages_chain_into_a_step_distilled_checkpoint(recipe_run: tuple[Recipe, list[str]]) -> None:
    recipe, lines = recipe_run
    assert any("dataset: present, skipped" in line for line in lines)
    assert (recipe.final("autoencoder") / "metrics.json").is_file()
    for stage in ("teacher", "distill", "step_distill"):
        final = recipe.final(stage)
        assert (final / "model_index.json").is_file(), stage
        assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert stage_info(recipe.out / stage)["steps"] >= 1
    # Each student stage read its predecessor: distill from the teacher, step-distill from distill.
    distill_cfg = json.loads((recipe.out / "distill" / "train_config.json").read_text())
    assert distill_cfg["teacher"]["path"].endswith("teacher/final/unet")
    assert distill_cfg["model"]["text_path"].endswith("teacher/final/text_conditioner")
    step_cfg = json.loads((recipe.out / "step_distill" / "train_config.json").read_text())
    assert step_cfg["stage"] == "step-distill"
    assert step_cfg["model"]["unet_path"].endswith("distill/final/unet")
    assert step_cfg["step_distill"]["student_steps"] == 4
    assert step_cfg["step_distill"]["teacher_guidance"] == 3.0  # CFG-guided targets ran end to end
    # Every denoiser stage trains at the recipe's timestep shift, and the checkpoints sample at it.
    for stage in ("teacher", "distill", "step_distill"):
        cfg = json.loads((recipe.out / stage / "train_config.json").read_text())
        assert cfg["flow"]["shift"] == recipe.cfg.flow_shift, stage
        index = json.loads((recipe.final(stage) / "model_index.json").read_text())
        assert index["_snapgen_defaults"]["shift"] == recipe.cfg.flow_shift, stage
    # The budgeted stages were stopped by the recipe and ended with a cooldown: the run went on from
    # the step it reached with the learning rate decaying to (nearly) 0 by its last step.
    for stage in ("teacher", "distill", "step_distill"):
        assert any(f"{stage}: cooldown, " in line for line in lines), stage
        cfg = json.loads((recipe.out / "configs" / f"{stage}.json").read_text())  # the run's last config
        assert 0 < cfg["optim"]["decay_from"] < cfg["max_steps"], stage
        rates = [
            json.loads(line)["data"]["lr"]
            for line in (recipe.out / stage / "events.jsonl").read_text().splitlines()
            if '"progress"' in line and '"lr"' in line
        ]
        if stage != "step_distill":  # its few steps here are still in its 20-step warm-up
            assert rates[-1] < 0.5 * max(rates), (stage, rates)
    # The stable phase's max_steps is a placeholder; its progress events count their ETA against
    # the stage's minutes instead (the trainer got them as --max-minutes).
    events = [json.loads(line) for line in (recipe.out / "teacher" / "events.jsonl").read_text().splitlines()]
    stable = [e for e in events if e["kind"] == "progress" and e["total"] == 1_000_000]
    assert stable and all(0 <= e["eta_s"] <= recipe.cfg.minutes("teacher") * 60 for e in stable)
    summary = recipe.summary()
    assert summary["teacher"]["steps"] == stage_info(recipe.out / "teacher")["steps"]


def test_rerun_skips_finished_stages_and_finalises_a_stopped_one(
    recipe_run: tuple[Recipe, list[str]],
) -> None:
    recipe, _ = recipe_run
    weights = recipe.final("teacher") / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    step = stage_info(recipe.out / "distill")["steps"]
    # Lose the distilled student's final folder: its checkpoint and spent clock remain.
    import shutil

    shutil.rmtree(recipe.final("distill"))
    lines: list[str] = []
    again = Recipe(recipe.cfg, log=lines.append)
    again.run(["dataset", "autoencoder", "teacher", "distill"])
    assert any("autoencoder: done, skipped" in line for line in lines)
    assert any("teacher: done, skipped" in line for line in lines)
    assert weights.stat().st_mtime_ns == before  # not trained again
    # Its cooldown had ended: it goes on with the saved cooldown config and only writes final/.
    assert any("distill: cooldown goes on to step" in line for line in lines)
    assert stage_info(again.out / "distill")["steps"] == step
    assert not any("distill: starting" in line or "distill: resuming" in line for line in lines)
    assert (again.final("distill") / "model_index.json").is_file()


def test_stages_run_as_several_ranks_with_the_same_effective_batch(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """``processes`` 2: the teacher and the KD student each train as two CPU ranks under
    ``accelerate launch``, each rank with half the batch and threads; a stage stopped on its budget
    cools down and finalises as in one process, and its samples count both ranks. Step distillation
    (not faster as ranks) stays one process."""
    recipe, _ = recipe_run
    _copy_stages(recipe, tmp_path, ("dataset", "autoencoder", "text-init"))
    lines: list[str] = []
    cfg = recipe.cfg.replace(out=str(tmp_path), processes=2, threads=2, step_distill_batch_size=4)
    ranked = Recipe(cfg, log=lines.append)
    ranked.run(["dataset", "autoencoder", "teacher", "distill", "step_distill"])
    for stage, batch, ranks in (("teacher", 2, 2), ("distill", 2, 2), ("step_distill", 4, 1)):
        saved = json.loads((tmp_path / "configs" / f"{stage}.json").read_text())
        assert (saved["batch_size"], saved["cpu_threads"]) == (batch // ranks, 2 // ranks), stage
        assert any(f"{stage}: cooldown, " in line for line in lines), stage
        assert (ranked.final(stage) / "model_index.json").is_file(), stage
        info = stage_info(tmp_path / stage)
        assert info["processes"] == ranks and info["samples"] == info["steps"] * batch, (stage, info)
        assert ranked.summary()[stage]["samples"] == info["samples"]
        checkpoints = sorted((tmp_path / stage / "checkpoints").glob("step-*"))
        assert checkpoints and (checkpoints[-1] / "rng-1.safetensors").is_file() == (ranks == 2), stage
    with pytest.raises(SnapGenError, match="processes"):
        RecipeConfig(processes=2, threads=3)
    assert config_from_args(["--out", str(tmp_path / "new"), "--processes", "2"]).processes == 2
    assert RecipeConfig().processes == 1  # not a reliable gain on the 2-core CPUs measured (session 28)


def test_a_copied_run_trains_a_reopened_teacher_on_and_leaves_the_source_alone(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """benchmarks/copy_run.py --reopen teacher: the copy resumes the finished teacher from its last
    checkpoint for the extra minutes and cools it down again; the source run is not touched."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("copy_run", ROOT / "benchmarks" / "copy_run.py")
    assert spec is not None and spec.loader is not None
    copy_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy_run)

    recipe, _ = recipe_run
    source_events = (recipe.out / "teacher" / "events.jsonl").read_bytes()
    source_steps = stage_info(recipe.out / "teacher")["steps"]
    # Minutes whose stable phase ends 3 s past the teacher's clock (its cooldown may have overrun
    # its budget on a loaded machine).
    spent = json.loads((recipe.out / "clock" / "teacher.json").read_text())["seconds"]
    extra = (spent + 3.0) / (1.0 - recipe.cfg.cooldown_fraction) / 60.0
    minutes = {**recipe.cfg.stage_minutes, "teacher": extra}
    arm = copy_run.copy_run(recipe.out, tmp_path / "arm", {"stage_minutes": minutes}, reopen="teacher")
    assert not (tmp_path / "arm" / "distill").exists()  # trained from the old teacher: left out
    source_summary = recipe.summary()
    copied = json.loads((tmp_path / "arm" / "summary.json").read_text())
    assert copied["autoencoder"] == source_summary["autoencoder"]  # linked as is: its entry too
    assert "teacher" not in copied and "distill" not in copied  # reopened / left out: written anew
    lines: list[str] = []
    Recipe(RecipeConfig.from_dict(json.loads(arm.read_text())), log=lines.append).run(
        ["dataset", "autoencoder", "teacher"]
    )
    assert any("teacher: resuming" in line for line in lines)
    assert any("teacher: cooldown, " in line for line in lines)
    assert stage_info(tmp_path / "arm" / "teacher")["steps"] > source_steps
    assert (tmp_path / "arm" / "teacher" / "final" / "model_index.json").is_file()
    arm_summary = json.loads((tmp_path / "arm" / "summary.json").read_text())
    assert arm_summary["autoencoder"] == source_summary["autoencoder"]
    assert arm_summary["teacher"]["steps"] > source_steps
    assert (recipe.out / "teacher" / "events.jsonl").read_bytes() == source_events
    assert stage_info(recipe.out / "teacher")["steps"] == source_steps


def test_make_subset_links_the_first_images(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    rows = []
    for i in range(5):
        (source / f"{i:08d}.png").write_bytes(b"png")
        rows.append(json.dumps({"file_name": f"{i:08d}.png", "text": f"caption {i}"}))
    (source / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    target = make_subset(source, tmp_path / "subset", 3)
    lines = (target / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["file_name"] for line in lines] == [
        "00000000.png",
        "00000001.png",
        "00000002.png",
    ]
    assert (target / "00000002.png").is_symlink() and not (target / "00000003.png").exists()


def test_step_distillation_can_learn_the_kd_students_own_trajectories(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """``step_distill_targets_from`` "student": the frozen KD student, not the teacher, makes the
    targets (and carries the discriminator's heads); the stage trains and finishes as usual."""

    recipe, _ = recipe_run
    _copy_stages(recipe, tmp_path, ("dataset", "autoencoder", "text-init", "cache", "teacher", "distill"))
    lines: list[str] = []
    cfg = recipe.cfg.replace(out=str(tmp_path), step_distill_targets_from="student")
    Recipe(cfg, log=lines.append).run(["step_distill"])
    saved = json.loads((tmp_path / "configs" / "step_distill.json").read_text())
    assert saved["teacher"]["path"] == str(tmp_path / "distill" / "final" / "unet")
    assert saved["model"]["unet_path"] == saved["teacher"]["path"]
    assert (tmp_path / "step_distill" / "final" / "unet").is_dir()
    original = json.loads((recipe.out / "configs" / "step_distill.json").read_text())
    assert original["teacher"]["path"] == str(recipe.out / "teacher" / "final" / "unet")


def test_config_rejects_unknown_stage_minutes() -> None:
    from snapgen_app.errors import SnapGenError

    with pytest.raises(SnapGenError, match="stage_minutes"):
        RecipeConfig(stage_minutes={"teachers": 3.0})
    for steps in (2, 6):  # fewer teacher steps than the student's 4, or not the same number per step
        with pytest.raises(SnapGenError, match="teacher_steps_for_targets"):
            RecipeConfig(teacher_steps_for_targets=steps)
    with pytest.raises(SnapGenError, match="step_distill_targets_from"):
        RecipeConfig(step_distill_targets_from="ablation")


def test_a_run_folder_resumes_with_its_saved_config(tmp_path: Path) -> None:
    """`--stages ship --ship` on a trained run keeps the run's settings (it once rewrote
    recipe.json with the defaults, and the ship stage then trained a classifier of its own)."""
    from training_tools.recipes.emoji_default import config_from_args

    saved = RecipeConfig(out=str(tmp_path), budget_minutes=108.0, eval_per_category=40, classifier="clf")
    (tmp_path / "recipe.json").write_text(json.dumps(saved.to_dict()))
    cfg = config_from_args(["--out", str(tmp_path), "--stages", "ship", "--ship"])
    assert (cfg.budget_minutes, cfg.eval_per_category, cfg.classifier) == (108.0, 40, "clf")
    # An option given with a non-default value still wins.
    cfg = config_from_args(["--out", str(tmp_path), "--threads", "1"])
    assert (cfg.threads, cfg.budget_minutes) == (1, 108.0)
    # So does one given with exactly its default value (80 here), and a flag mapped to another field.
    cfg = config_from_args(["--out", str(tmp_path), "--eval-per-category", "80", "--sequential"])
    assert (cfg.eval_per_category, cfg.parallel, cfg.budget_minutes) == (80, False, 108.0)
    # A new folder takes the command line as it is.
    fresh = config_from_args(["--out", str(tmp_path / "new")])
    assert fresh.budget_minutes == RecipeConfig().budget_minutes
    other = config_from_args(["--out", str(tmp_path / "new"), "--autoencoder-preset", "emoji-c8"])
    assert other.autoencoder_preset == "emoji-c8"
    targets = config_from_args(["--out", str(tmp_path / "new"), "--teacher-steps-for-targets", "4"])
    assert targets.teacher_steps_for_targets == 4 and fresh.teacher_steps_for_targets == 8
    own = config_from_args(["--out", str(tmp_path / "new"), "--step-distill-targets-from", "student"])
    assert own.step_distill_targets_from == "student" and fresh.step_distill_targets_from == "teacher"


def test_the_builtin_classifier_scores_a_run_of_its_own_classes_and_font(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default ("auto") EmojiEval uses the built-in model's classifier (no 7 min of training, scores
    comparable across runs) when it knows exactly this run's classes in the same font."""
    from training_tools.recipes.emoji_default import builtin_classifier, same_classes

    monkeypatch.setenv("SNAPGEN_BUILTIN_DIR", str(tmp_path / "builtin"))
    classes = {"format_version": 1, "seed": 0, "font_sha256": "ab" * 32, "classes": [{"codepoint": "1f34e"}]}
    shipped = builtin_classifier()
    assert shipped == tmp_path / "builtin" / "snapgen-emoji" / "eval" / "classifier"
    shipped.mkdir(parents=True)
    (shipped / "classes.json").write_text(json.dumps(classes | {"seed": None}))  # the seed may differ
    recipe = Recipe(RecipeConfig(out=str(tmp_path / "run")), log=lambda _line: None)
    recipe.dataset_dir.mkdir(parents=True)
    (recipe.dataset_dir / "classes.json").write_text(json.dumps(classes))
    assert recipe.cfg.classifier == "auto" and recipe.classifier_dir() == shipped
    # A directory given is used as it is.
    given = Recipe(RecipeConfig(out=str(tmp_path / "run"), classifier="clf"), log=lambda _line: None)
    assert given.classifier_dir() == Path("clf")
    # Other classes, another font, or no classifier at all: not the same (the recipe trains one).
    other = tmp_path / "other.json"
    for changed in ({"classes": [{"codepoint": "1f34f"}]}, {"font_sha256": "cd" * 32}):
        other.write_text(json.dumps(classes | changed))
        assert not same_classes(other, recipe.dataset_dir / "classes.json")
    assert not same_classes(tmp_path / "missing.json", recipe.dataset_dir / "classes.json")


def test_the_ablation_is_opt_in_and_runs_after_the_distilled_student_by_default(tmp_path: Path) -> None:
    """The default run trains what ships (the distilled student on both cores); ``--ablation`` adds the
    no-KD student after it, ``--parallel`` puts it beside it (one core each, as emoji-v7/v8 ran)."""
    from training_tools.recipes.emoji_default import config_from_args

    plain = config_from_args(["--out", str(tmp_path / "a")])
    assert (plain.ablation, plain.parallel) == (False, False)
    assert "student_no_kd_28" not in dict(Recipe(plain).eval_plan())
    after = config_from_args(["--out", str(tmp_path / "b"), "--ablation"])
    assert (after.ablation, after.parallel) == (True, False)
    assert "student_no_kd_28" in dict(Recipe(after).eval_plan())
    beside = config_from_args(["--out", str(tmp_path / "c"), "--ablation", "--parallel"])
    assert (beside.ablation, beside.parallel) == (True, True)
    # A run folder saved with the ablation beside (emoji-v8) resumes as it was; --no-ablation turns it off.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "recipe.json").write_text(
        json.dumps(RecipeConfig(ablation=True, parallel=True).to_dict())
    )
    assert config_from_args(["--out", str(tmp_path / "d")]).parallel
    assert not config_from_args(["--out", str(tmp_path / "d"), "--no-ablation"]).ablation


def test_an_ablation_matched_in_samples_trains_the_distilled_students_steps(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """``--ablation-match samples``: the no-KD student runs after the distilled one for exactly its
    steps at the same batch, the last ``cooldown_fraction`` of them cooling down, whatever the clock
    says; it cannot run beside the distilled student (whose steps it needs)."""
    from training_tools.recipes.emoji_default import config_from_args

    recipe, _ = recipe_run
    out = tmp_path / "samples"
    out.mkdir()
    _copy_stages(recipe, out, ("dataset", "cache", "autoencoder", "teacher", "distill", "text-init"))
    cfg = recipe.cfg.replace(out=str(out), ablation=True, ablation_match="samples", checkpoint_every=3)
    lines: list[str] = []
    Recipe(cfg, log=lines.append).run(["ablation"])
    distill_steps = stage_info(recipe.out / "distill")["steps"]
    assert stage_info(out / "ablation")["steps"] == distill_steps
    saved = json.loads((out / "configs" / "ablation.json").read_text())
    assert saved["max_steps"] == distill_steps and saved["stage"] == "pretrain" and "teacher" not in saved
    assert saved["optim"]["decay_from"] == cooldown_start(distill_steps, cfg.cooldown_fraction)
    cases = [(4582, 0.1), (10, 0.2), (10, 0.0), (3, 0.1)]  # the shipped student's 4,124; none; too few
    assert [cooldown_start(steps, fraction) for steps, fraction in cases] == [4124, 8, 0, 0]
    assert (out / "ablation" / "final" / "model_index.json").is_file()
    assert (
        json.loads((out / "summary.json").read_text())["ablation"]["samples"]
        == distill_steps * cfg.batch_size
    )
    # Stopped before its first checkpoint (its train_config.json and saved config, with decay_from,
    # are written at once): the same command trains it again, not "stopped before its first checkpoint".
    import shutil

    for part in ("checkpoints", "final"):
        shutil.rmtree(out / "ablation" / part)
    lines.clear()
    Recipe(cfg, log=lines.append).run(["ablation"])
    assert any(line.endswith("ablation: resuming (to the end)") for line in lines), lines
    assert stage_info(out / "ablation")["steps"] == distill_steps
    args = ["--out", str(tmp_path / "cli"), "--ablation", "--ablation-match", "samples"]
    assert config_from_args(args).ablation_match == "samples"
    with pytest.raises(Exception, match="parallel"):
        RecipeConfig(ablation=True, parallel=True, ablation_match="samples")
    with pytest.raises(Exception, match="ablation_match"):
        RecipeConfig(ablation_match="hours")


def test_stages_budgeted_in_steps_run_those_steps_whatever_the_clock_and_resume(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """``--stage-steps``: a denoiser stage runs for its optimizer steps, the last ``cooldown_fraction``
    of them cooling down, however few minutes the budget gives it (so a run measured on one CPU can be
    made again on a slower one); a stage stopped on the way goes on to the same step."""
    from training_tools import checkpoint as ckpt

    recipe, _ = recipe_run
    _copy_stages(recipe, tmp_path, ("dataset", "cache", "autoencoder", "text-init"))
    # A budget of a few milliseconds per stage: by minutes, the teacher would stop at its first checkpoint.
    cfg = recipe.cfg.replace(
        out=str(tmp_path), budget_minutes=0.001, stage_minutes={}, stage_steps={"teacher": 9, "distill": 4}
    )
    lines: list[str] = []
    Recipe(cfg, log=lines.append).run(["teacher", "distill"])
    for stage, steps in (("teacher", 9), ("distill", 4)):
        assert stage_info(tmp_path / stage)["steps"] == steps
        saved = json.loads((tmp_path / "configs" / f"{stage}.json").read_text())
        assert saved["max_steps"] == steps
        assert saved["optim"]["decay_from"] == cooldown_start(steps, cfg.cooldown_fraction)
        assert json.loads((tmp_path / "summary.json").read_text())[stage]["samples"] == steps * cfg.batch_size
    assert cooldown_start(9, 0.1) == 8
    # A crash after step 8: the stage goes on from that checkpoint to step 9 and finalises.
    import shutil

    shutil.rmtree(tmp_path / "teacher" / "final")
    assert [p.name for p in ckpt.set_aside(tmp_path / "teacher" / "checkpoints", 9)] == [
        "diverged-step-00000009"
    ]
    lines.clear()
    Recipe(cfg, log=lines.append).run(["teacher"])
    assert any(line.endswith("teacher: resuming (to the end)") for line in lines)
    assert (tmp_path / "teacher" / "final" / "model_index.json").is_file()
    assert _last_event(tmp_path / "teacher" / "events.jsonl")["step"] == 9
    # Stopped before its first checkpoint (session 30's KD stage, cut a minute after it started): the
    # stage starts again from step 0 rather than stopping with "before its first checkpoint".
    shutil.rmtree(tmp_path / "teacher" / "final")
    shutil.rmtree(tmp_path / "teacher" / "checkpoints")
    assert (tmp_path / "teacher" / "train_config.json").is_file()  # its decay_from (8) set from the start
    lines.clear()
    Recipe(cfg, log=lines.append).run(["teacher"])
    assert (tmp_path / "teacher" / "final" / "model_index.json").is_file()
    assert _last_event(tmp_path / "teacher" / "events.jsonl")["step"] == 9

    parsed = config_from_args(
        ["--out", str(tmp_path / "cli"), "--stage-steps", "teacher=7300", "distill=5200"]
    )
    assert parsed.stage_steps == {"teacher": 7300, "distill": 5200}
    with pytest.raises(SnapGenError, match="--stage-steps 'teacher=ten' is not STAGE=STEPS"):
        config_from_args(["--out", str(tmp_path / "cli"), "--stage-steps", "teacher=ten"])
    for bad, field in (
        ({"stage_steps": {"autoencoder": 5}}, "stage_steps"),  # the autoencoder trains for minutes
        ({"stage_steps": {"teacher": 0}}, "stage_steps"),
        ({"stage_steps": {"teacher": 5}, "stage_minutes": {"teacher": 9.0}}, "stage_steps"),
        ({"stage_steps": {"distill": 5}, "ablation": True}, "ablation_match"),  # no minutes to match
    ):
        with pytest.raises(SnapGenError, match=field):
            RecipeConfig(**bad)
    RecipeConfig(stage_steps={"distill": 5}, ablation=True, ablation_match="samples")


def test_a_python_without_torch_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stage runs as `sys.executable -m training_tools`: a Python without torch once
    detached, started the teacher and only then failed in the stage's log."""
    import importlib.util

    from training_tools.recipes import emoji_default

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    out = tmp_path / "run"
    assert emoji_default.main(["--out", str(out), "--background"]) == 1
    err = capsys.readouterr().err
    assert "has no torch" in err and "snapgen-studio[train]" in err
    assert not out.exists()  # nothing detached, no log folder, no recipe.json


def test_int8_calibration_prompts_are_a_seeded_sample_of_the_training_captions(tmp_path: Path) -> None:
    from training_tools.recipes.emoji_default import CALIBRATION_PROMPT_COUNT

    dataset = tmp_path / "run" / "dataset"
    dataset.mkdir(parents=True)
    captions = [f"caption {i % 12}" for i in range(40)]  # repeated captions count once
    (dataset / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n" for i, c in enumerate(captions))
    )
    recipe = Recipe(RecipeConfig(out=str(tmp_path / "run")), log=lambda _line: None)
    picked = recipe.calibration_prompts().read_text().splitlines()
    assert len(picked) == len(set(picked)) == CALIBRATION_PROMPT_COUNT
    assert set(picked) <= set(captions)
    assert recipe.calibration_prompts().read_text().splitlines() == picked  # same seed, same prompts


def test_a_stage_clock_starts_with_this_process_training_loop(tmp_path: Path) -> None:
    """The budget clock ignores start-up and caching: it waits for this trainer process's first
    progress report or resume message, not for events an earlier process left in the file."""
    from training_tools.recipes.emoji_default import _training_started

    events = tmp_path / "events.jsonl"
    assert not _training_started(events)
    events.write_text(
        '{"kind": "started", "step": 0}\n{"kind": "progress", "step": 10}\n{"kind": "cancelled"}\n'
    )
    assert _training_started(events)
    offset = events.stat().st_size  # a resumed process starts writing here
    assert not _training_started(events, offset)
    with events.open("a") as f:
        f.write('{"kind": "started", "step": 0}\n{"kind": "log", "message": "dataset: 12 images"}\n')
    assert not _training_started(events, offset)  # still caching
    with events.open("a") as f:
        f.write('{"kind": "log", "step": 178, "message": "resumed from step-00000178"}\n')
    assert _training_started(events, offset)


def test_ship_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    """Shipping replaces its target whole: the model store's ``builtin/`` given instead of
    ``builtin/snapgen-emoji`` is refused, and nothing in it is touched."""
    from snapgen_app.errors import TrainingError
    from training_tools.recipes import ship

    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "bundle.json").write_text("{}")
    store = tmp_path / "builtin"
    (store / "snapgen-emoji").mkdir(parents=True)
    (store / "README.md").write_text("the store")
    with pytest.raises(TrainingError, match="not a model folder"):
        ship.ship(Recipe(RecipeConfig(out=str(run))), store)
    assert (store / "README.md").read_text() == "the store"
    assert (store / "snapgen-emoji").is_dir()
    assert not (tmp_path / "builtin.tmp").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_stops_the_recipe_with_a_checkpoint_and_the_same_command_resumes(
    tmp_path: Path, processes: int
) -> None:
    """`kill PID` of a running recipe: the trainer it runs writes a checkpoint, the stage clock keeps
    the minutes trained, the recipe exits 130 saying how to resume; the same command then resumes
    the stage (not from zero) and finishes it. With two ranks the signal reaches them through
    ``accelerate launch``."""
    out = tmp_path / "run"
    cfg = _config(out).replace(
        stage_minutes={"autoencoder": 0.02, "teacher": 0.3}, processes=processes, threads=processes
    )
    build(
        out / "dataset",
        BuildConfig(num_images=cfg.num_images, seed=0, num_classes=8, class_seed=3),
        classes=curate(8, seed=3),
    )
    (out / "recipe.json").write_text(json.dumps(cfg.to_dict()))
    command = [sys.executable, "-m", "training_tools.recipes.emoji_default", "--out", str(out)]
    command += ["--stages", "dataset,autoencoder,teacher"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clock = out / "clock" / "teacher.json"  # written once the recipe sees the training loop run
    deadline = time.monotonic() + 120
    while not clock.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the teacher never started training"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped during teacher" in err and "run the same command again to resume" in err
    assert not (out / "teacher" / "final").exists()
    assert list((out / "teacher" / "checkpoints").glob("step-*")), "no checkpoint written on SIGTERM"
    trained = json.loads(clock.read_text())["seconds"]
    assert 0.0 < trained < 0.3 * 60
    log = (out / "logs" / "recipe.log").read_text()
    assert "recipe: stopped during teacher" in log and "teacher: finished" not in log

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    log = (out / "logs" / "recipe.log").read_text()
    assert "teacher: resuming" in log and "teacher: finished" in log
    assert (out / "teacher" / "final" / "model_index.json").is_file()
    assert json.loads(clock.read_text())["seconds"] >= trained


def test_the_no_kd_twin_trains_the_recipes_student_without_teacher_for_given_steps(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """benchmarks/no_kd_twin.py: a run folder with the KD run's dataset, the given autoencoder in fp32,
    fresh text projections and the recipe's no-KD config for exactly the given steps (a cooldown over
    the last tenth), which trains to a ``final/`` that the recipe's ablation eval row reads."""
    import importlib.util
    import shutil

    import torch
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("no_kd_twin", ROOT / "benchmarks" / "no_kd_twin.py")
    assert spec is not None and spec.loader is not None
    no_kd_twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(no_kd_twin)

    recipe, _ = recipe_run
    out = tmp_path / "twin"
    out.mkdir()
    shutil.copytree(recipe.out / "dataset", out / "dataset")
    source_ae = recipe.final("autoencoder")
    cfg = recipe.cfg.replace(out=str(out))
    config_path = no_kd_twin.prepare(cfg, 10, 0.2, source_ae)
    train = json.loads(config_path.read_text())
    assert train["stage"] == "pretrain" and "teacher" not in train and "kd" not in train
    assert train["max_steps"] == 10 and train["optim"]["decay_from"] == 8
    assert train["model"]["unet_preset"] == recipe.cfg.student_preset
    assert train["model"]["text_path"] == str(out / "text-init")
    assert train["model"]["autoencoder_path"] == str(out / "autoencoder" / "final")
    assert json.loads((out / "recipe.json").read_text())["ablation"] is True
    copied = load_file(str(out / "autoencoder" / "final" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(source_ae / "diffusion_pytorch_model.safetensors"))
    assert copied.keys() == original.keys()
    assert all(
        copied[k].dtype == torch.float32 and torch.equal(copied[k], original[k].float()) for k in copied
    )

    # The script itself goes on with the folder's recipe.json and trains through the recipe's launcher.
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "no_kd_twin.py"),
            "--out",
            str(out),
            "--steps",
            "10",
            "--cooldown",
            "0.2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert stage_info(out / "ablation")["steps"] == 10
    assert json.loads((out / "summary.json").read_text())["ablation"]["steps"] == 10
    twin = Recipe(RecipeConfig.from_dict(json.loads((out / "recipe.json").read_text())))
    plan = dict(twin.eval_plan())
    assert plan["student_no_kd_28"]["checkpoint"] == "ablation"
    assert (twin.final("ablation") / "model_index.json").is_file()
    # Prepared again (to resume), the run keeps the config it trained with.
    assert no_kd_twin.prepare(cfg, 99, 0.5, source_ae) == config_path
    assert json.loads(config_path.read_text())["max_steps"] == 10


def test_retrain_stage_trains_a_finished_stage_again_with_a_change_for_the_same_steps(
    recipe_run: tuple[Recipe, list[str]], tmp_path: Path
) -> None:
    """benchmarks/retrain_stage.py: the KD student trained again with another KD scaling in a copy of
    the run, from the same teacher, with the same seed, steps and cooldown start; nothing else differs
    from the stage's saved config but the run folder. A bad --set fails before anything is written."""
    import torch
    from safetensors.torch import load_file

    recipe, _ = recipe_run
    src, dst = recipe.out, tmp_path / "arm"
    script = [sys.executable, str(ROOT / "benchmarks" / "retrain_stage.py"), str(src), str(dst)]

    bad = subprocess.run(
        [*script, "--stage", "distill", "--set", "kd.scaling=nonsense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "scaling: 'nonsense'" in bad.stderr and not dst.exists()

    done = subprocess.run(
        [*script, "--stage", "distill", "--set", "kd.scaling=kd_only", "--set", "kd.feature_weight=0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    original = json.loads((src / "configs" / "distill.json").read_text())
    arm = json.loads((dst / "configs" / "distill.json").read_text())
    assert arm["kd"] == {**original["kd"], "scaling": "kd_only", "feature_weight": 0.5}
    assert arm["teacher"]["path"] == str(dst / "teacher" / "final" / "unet")
    assert arm["run_dir"] == str(dst / "distill")
    unchanged = {k: v for k, v in original.items() if k not in ("kd", "teacher", "run_dir", "model", "data")}
    assert {k: arm[k] for k in unchanged} == unchanged  # seed, batch, max_steps, optim (decay_from)
    assert original["optim"]["decay_from"] > 0
    steps = stage_info(src / "distill")["steps"]
    assert stage_info(dst / "distill")["steps"] == steps == arm["max_steps"]
    assert json.loads((dst / "summary.json").read_text())["distill"]["steps"] == steps
    assert not (dst / "step_distill").exists()  # trained from the stage: left out
    teacher = "teacher/final/unet/diffusion_pytorch_model.safetensors"
    assert (dst / teacher).samefile(src / teacher)  # the same teacher, hard-linked
    weights = "distill/final/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(src / weights)), load_file(str(dst / weights))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # the change trained
    plan = dict(Recipe(RecipeConfig.from_dict(json.loads((dst / "recipe.json").read_text()))).eval_plan())
    assert plan["student_distilled_28"]["checkpoint"] == "distill"


def test_a_saved_eval_row_scored_another_way_is_scored_again() -> None:
    """``--eval-per-category 80`` on a run whose rows were scored with 40 prompts, or a classifier
    that changed since: those rows are scored again instead of being reported under the new
    settings (rows of older runs, which record neither, are judged by their image count)."""
    from training_tools.recipes.emoji_default import _stale_row

    scorer = {"prompts_per_category": 80, "classifier_sha256": "a"}
    assert (
        _stale_row({"prompts_per_category": 80, "classifier_sha256": "a", "num_images": 400}, scorer) is None
    )
    assert _stale_row({"prompts_per_category": 40, "classifier_sha256": "a"}, scorer) == (
        "40 prompts per category, not 80"
    )
    assert _stale_row({"num_images": 200}, scorer) == "40 prompts per category, not 80"
    assert _stale_row({"num_images": 400}, scorer) is None
    assert _stale_row({"prompts_per_category": 80, "classifier_sha256": "b"}, scorer) == "another classifier"
