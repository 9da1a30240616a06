"""Whole runs on tiny models: pretraining, exact resume, multi-level KD, step distillation, LoRA."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import test_training_helpers as helpers
import torch
from test_training_helpers import base_config, loss_curve, read_events, run_quietly

from snapgen_app.errors import Cancelled
from snapgen_app.model.text_encoders import TextConditioner
from snapgen_app.model.unet import SnapGenUNet
from training_tools import checkpoint, flow
from training_tools.config import TrainConfig
from training_tools.models import build_student_parts
from training_tools.text import TextStep

shapes = helpers.shapes
teachers = helpers.teachers


def test_pretrain_loss_goes_down_with_events_samples_and_final(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    data, cache = shapes
    cfg = base_config(
        tmp_path,
        data,
        cache,
        max_steps=40,
        mixed_precision="bf16",
        sample_every=20,
        checkpoint_every=20,
        **{"optim.lr": 2e-3},
    )
    summary = run_quietly(cfg)
    curve = loss_curve(Path(cfg.run_dir))
    first = sum(curve[s] for s in range(1, 9)) / 8
    last = sum(curve[s] for s in range(33, 41)) / 8
    print(f"pretrain task loss: first 8 steps {first:.4f}, last 8 steps {last:.4f}")
    assert last < first * 0.85
    events = read_events(Path(cfg.run_dir))
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert "memory_gib" in events[0].data["estimate"]
    progress = [e for e in events if e.kind == "progress"]
    assert progress[-1].step == 40 and progress[-1].total == 40 and progress[-1].data["samples_per_s"] > 0
    assert progress[5].eta_s is not None
    previews = [e for e in events if e.kind == "preview"]
    assert len(previews) == 2 and all(Path(p).is_file() for e in previews for p in e.data["samples"])
    final = Path(summary["final"])
    SnapGenUNet.from_pretrained(final / "unet")  # loads as a plain diffusers component
    assert (final / "text_conditioner" / "config.json").exists() and (final / "model_index.json").exists()
    assert checkpoint.latest(Path(cfg.run_dir) / "checkpoints").name == "step-00000040"


def test_resume_continues_exactly(tmp_path: Path, shapes: tuple[Path, Path]) -> None:
    data, cache = shapes
    common = {
        "max_steps": 6,
        "optim.warmup_steps": 2,
        "optim.schedule": "cosine",
        "optim.grad_accum": 2,
        "model.text_dropout": 0.3,
    }
    straight = base_config(tmp_path / "a", data, cache, **common)
    run_quietly(straight)
    sliced = base_config(tmp_path / "b", data, cache, **common)
    with pytest.raises(Cancelled):
        run_quietly(sliced, stop_after=3)
    assert checkpoint.latest(Path(sliced.run_dir) / "checkpoints").name == "step-00000003"
    run_quietly(sliced, resume=True)
    a, b = loss_curve(Path(straight.run_dir)), loss_curve(Path(sliced.run_dir))
    print("uninterrupted", a, "\nresumed", b)
    assert a == b  # bit-identical losses for all 6 steps
    wa = SnapGenUNet.from_pretrained(Path(straight.run_dir) / "final" / "unet").state_dict()
    wb = SnapGenUNet.from_pretrained(Path(sliced.run_dir) / "final" / "unet").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_budget_stops_with_a_checkpoint_and_eta_counts_against_it(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    # A time-budgeted run (the recipe's stages, `snapgen train --max-minutes`) has a placeholder
    # max_steps: the ETA must come from the time left, and the run must end saved, resumable.
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, max_steps=100_000, log_every=1)
    with pytest.raises(Cancelled):
        run_quietly(cfg, max_seconds=1.5)
    progress = [e for e in read_events(Path(cfg.run_dir)) if e.kind == "progress"]
    last = progress[-1].step
    print(f"stopped at step {last}; ETAs {[round(e.eta_s or -1, 2) for e in progress[:3]]} ...")
    assert 0 < last < 100_000
    assert all(e.eta_s is not None and e.eta_s <= 1.5 for e in progress)
    assert progress[-1].eta_s == 0.0
    assert checkpoint.latest(Path(cfg.run_dir) / "checkpoints").name == f"step-{last:08d}"


def _velocity_distance(
    student: SnapGenUNet, s_text: TextStep, teacher: torch.nn.Module, t_text: TextStep, latents: torch.Tensor
) -> float:
    prompts = ["a red circle", "a blue square", "a green circle", "a yellow square"]
    gen = torch.Generator().manual_seed(123)
    eps = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    x_t = flow.add_noise(latents, eps, t)
    with torch.no_grad():
        s_tok, s_pool = s_text.encode(prompts)
        t_tok, t_pool = t_text.encode(prompts)
        v_s = student(x_t, t * 1000, s_tok, s_pool)
        v_t = teacher(x_t, t, t_tok, t_pool)[0]
    return float((v_s - v_t).pow(2).mean())


def test_distillation_pulls_the_student_velocity_toward_the_teacher(
    tmp_path: Path, shapes: tuple[Path, Path], teachers: dict[str, Path]
) -> None:
    from training_tools.teachers import load_teacher

    data, cache = shapes
    cfg = base_config(
        tmp_path,
        data,
        cache,
        stage="distill",
        max_steps=30,
        **{
            "teacher.kind": "sd3",
            "teacher.path": str(teachers["sd3"]),
            "kd.scaling": "kd_only",
            "optim.ema": False,
        },
    )
    torch.manual_seed(cfg.seed)  # the trainer's initialisation: the student before training
    parts = build_student_parts(cfg)
    teacher = load_teacher("sd3", teachers["sd3"])
    latents = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    before = _velocity_distance(parts.unet.eval(), parts.text, teacher, parts.text, latents)
    summary = run_quietly(cfg)
    final = Path(summary["final"])
    student = SnapGenUNet.from_pretrained(final / "unet").eval()
    s_text = TextStep(
        TextConditioner.from_pretrained(
            final / "text_conditioner", encoders=list(parts.text.conditioner.encoders)
        )
    )
    after = _velocity_distance(student, s_text, teacher, parts.text, latents)
    curve_feat = loss_curve(Path(cfg.run_dir), "kd_feat")
    print(
        f"student-teacher velocity MSE before {before:.4f} after {after:.4f}; feature KD {curve_feat[1]:.4f} -> {curve_feat[30]:.4f}"
    )
    assert after < 0.7 * before
    assert curve_feat[30] < curve_feat[1]


def test_timestep_aware_distillation_runs_with_every_teacher_kind(
    tmp_path: Path, shapes: tuple[Path, Path], teachers: dict[str, Path]
) -> None:
    data, cache = shapes
    for kind in ("snapgen", "unet2d"):
        cfg = base_config(
            tmp_path / kind,
            data,
            cache,
            stage="distill",
            max_steps=2,
            **{
                "teacher.kind": kind,
                "teacher.path": str(teachers[kind]),
                "model.gradient_checkpointing": kind == "unet2d",
            },
        )
        terms = run_quietly(cfg)["loss"]
        assert {"task", "kd_out", "kd_feat", "total"} <= set(terms)


def _step_distill_config(
    tmp_path: Path, shapes: tuple[Path, Path], teacher_dir: Path, steps: int, **extra: object
) -> TrainConfig:
    """A step-distillation run whose student starts as the tiny teacher itself."""
    data, cache = shapes
    fields = {
        "teacher.path": str(teacher_dir),
        "model.unet_path": str(teacher_dir),
        "model.train_text": False,
        "kd.scaling": "kd_only",
        "optim.lr": 1e-4,
        "optim.ema": False,
    }
    return base_config(tmp_path, data, cache, stage="step-distill", max_steps=steps, **fields, **extra)


def test_step_distillation_brings_4_steps_closer_to_the_teacher_28(
    tmp_path: Path, shapes: tuple[Path, Path], teachers: dict[str, Path]
) -> None:
    teacher_dir = teachers["snapgen"]
    cfg = _step_distill_config(
        tmp_path, shapes, teacher_dir, 50, **{"step_distill.adv_weight": 0.05, "step_distill.disc_lr": 1e-3}
    )
    torch.manual_seed(cfg.seed)
    parts = build_student_parts(cfg)
    teacher = SnapGenUNet.from_pretrained(teacher_dir).eval()
    prompts = ["a red circle", "a blue square", "a green circle", "a yellow square"]

    def sample(unet: torch.nn.Module, steps: int) -> torch.Tensor:
        tokens, pooled = parts.text.encode(prompts)
        noise = torch.stack(
            [torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]
        )
        return flow.euler_sample(lambda x, t: unet(x, t * 1000, tokens, pooled), noise, steps, 1.0)

    with torch.no_grad():
        reference = sample(teacher, 28)
        before = float((sample(teacher, 4) - reference).pow(2).mean())  # the student starts as the teacher
    summary = run_quietly(cfg)
    student = SnapGenUNet.from_pretrained(Path(summary["final"]) / "unet").eval()
    with torch.no_grad():
        after = float((sample(student, 4) - reference).pow(2).mean())
    gen, disc = loss_curve(Path(cfg.run_dir), "gen"), loss_curve(Path(cfg.run_dir), "disc")
    g0 = sum(gen[s] for s in range(1, 6)) / 5
    g_moved = max(abs(gen[s] - g0) for s in range(41, 51))  # the generator loss answers the discriminator
    d0, d1 = sum(disc[s] for s in range(1, 6)) / 5, sum(disc[s] for s in range(46, 51)) / 5
    print(f"4-step vs teacher 28-step latent MSE: before {before:.5f} after {after:.5f}")
    print(
        f"generator loss {g0:.3f}, moved by up to {g_moved:.3f} late; discriminator loss {d0:.3f} -> {d1:.3f}"
    )
    assert after < 0.85 * before
    assert g_moved > 0.1 and d1 < d0 - 0.05


def test_guided_step_distillation_learns_the_teachers_cfg_trajectories_without_cfg(
    tmp_path: Path, shapes: tuple[Path, Path], teachers: dict[str, Path]
) -> None:
    """With ``teacher_guidance`` w the student's plain 4-step samples (one call per step) move
    towards the teacher's 28-step samples under CFG w, and away from the unguided ones."""
    teacher_dir, w = teachers["snapgen"], 3.0
    cfg = _step_distill_config(
        tmp_path,
        shapes,
        teacher_dir,
        40,
        **{"step_distill.adv_weight": 0.0, "step_distill.teacher_guidance": w},
    )
    torch.manual_seed(cfg.seed)
    parts = build_student_parts(cfg)
    teacher = SnapGenUNet.from_pretrained(teacher_dir).eval()
    prompts = ["a red circle", "a blue square", "a green circle", "a yellow square"]
    tokens, pooled = parts.text.encode(prompts)
    null_tokens, null_pooled = parts.text.encode(prompts, drop_all=True)
    noise = torch.stack(
        [torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]
    )

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = teacher(x, t * 1000, tokens, pooled)
        return cond + (w - 1.0) * (cond - teacher(x, t * 1000, null_tokens, null_pooled))

    def plain(unet: torch.nn.Module) -> torch.Tensor:
        return flow.euler_sample(lambda x, t: unet(x, t * 1000, tokens, pooled), noise, 4, 1.0)

    with torch.no_grad():
        reference = flow.euler_sample(guided, noise, 28, 1.0)
        unguided = flow.euler_sample(lambda x, t: teacher(x, t * 1000, tokens, pooled), noise, 28, 1.0)
        before = float((plain(teacher) - reference).pow(2).mean())
    student = SnapGenUNet.from_pretrained(Path(run_quietly(cfg)["final"]) / "unet").eval()
    with torch.no_grad():
        samples = plain(student)
    after = float((samples - reference).pow(2).mean())
    print(f"plain 4 steps vs teacher 28 steps at CFG {w}: MSE before {before:.5f}, after {after:.5f}")
    assert float((reference - unguided).pow(2).mean()) > 0.2 * before  # CFG matters for this teacher
    assert after < 0.6 * before  # unguided targets (teacher_guidance 1): 0.74


def test_lora_finetune_merges_into_a_plain_unet(
    tmp_path: Path, shapes: tuple[Path, Path], teachers: dict[str, Path]
) -> None:
    data, cache = shapes
    base = teachers["snapgen"]
    cfg = base_config(
        tmp_path,
        data,
        cache,
        stage="finetune",
        max_steps=6,
        **{"model.unet_path": str(base), "lora.rank": 4, "model.train_text": False, "optim.lr": 5e-3},
    )
    summary = run_quietly(cfg)
    assert "kd_out" in summary["loss"]  # the base model regularises as teacher
    # ... as a plain sum: the timestep-aware ratio |L_task|/|L_kd| is unbounded where LoRA starts
    # (student == base) and pinned fine-tuning runs to the base model.
    loss = summary["loss"]
    assert loss["kd_out"] > 0
    assert loss["total"] - loss["task"] == pytest.approx(loss["kd_out"], rel=0.02)  # not total == task
    assert summary["estimate"]["trainable_m"] < summary["estimate"]["params_m"] / 5
    final = Path(summary["final"]) / "unet"
    merged = SnapGenUNet.from_pretrained(final).state_dict()
    assert not any("lora" in k for k in merged)
    original = SnapGenUNet.from_pretrained(base).state_dict()
    assert set(merged) == set(original)
    changed = [k for k in merged if not torch.equal(merged[k], original[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in {"to_q", "to_k", "to_v", "to_out"} for k in changed)


def test_a_cooldown_decays_the_learning_rate_from_its_step_and_may_be_added_at_resume(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    from training_tools.config import config_differences
    from training_tools.trainer import lr_lambda

    factor = lr_lambda(2, 10, "constant", decay_from=6)
    assert [factor(s) for s in (0, 1, 2, 5)] == [0.5, 1.0, 1.0, 1.0]  # warm-up, then constant
    cooling = [factor(s) for s in range(6, 11)]
    assert cooling[0] == 1.0 and cooling[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in itertools.pairwise(cooling))  # falls every step
    assert lr_lambda(2, 10, "constant")(9) == 1.0  # no cooldown without decay_from
    # A run stopped on time goes on with a cooldown: only max_steps and optim.decay_from change.
    data, cache = shapes
    first = base_config(tmp_path / "run", data, cache, max_steps=100)
    with pytest.raises(Cancelled):
        run_quietly(first, stop_after=3)
    cooled = base_config(tmp_path / "run", data, cache, **{"max_steps": 6, "optim.decay_from": 3})
    assert config_differences(first, cooled) == []
    run_quietly(cooled, resume=True)
    rates = [e.data["lr"] for e in read_events(Path(cooled.run_dir)) if e.kind == "progress"]
    assert rates[-1] < rates[0]


def test_a_preset_unet_takes_the_latent_channels_of_its_autoencoder(
    tmp_path: Path, shapes: tuple[Path, Path]
) -> None:
    """Presets name an architecture: with an 8-channel autoencoder the UNet takes and predicts 8
    channels, samples and checkpoints follow, and a student distilled from it does too."""
    data, _ = shapes
    ae8 = str(helpers.save_autoencoder(tmp_path / "ae8", 8))
    cache = tmp_path / "cache8"
    teacher_cfg = base_config(
        tmp_path / "t", data, cache, max_steps=3, sample_every=3, **{"model.autoencoder_path": ae8}
    )
    final = Path(run_quietly(teacher_cfg)["final"])
    unet = SnapGenUNet.from_pretrained(final / "unet")
    assert (unet.unet_config.in_channels, unet.unet_config.out_channels) == (8, 8)
    previews = [e for e in read_events(Path(teacher_cfg.run_dir)) if e.kind == "preview"]
    assert previews and all(Path(p).is_file() for e in previews for p in e.data["samples"])
    student_cfg = base_config(
        tmp_path / "s",
        data,
        cache,
        stage="distill",
        max_steps=2,
        **{"model.autoencoder_path": ae8, "teacher.kind": "snapgen", "teacher.path": str(final / "unet")},
    )
    student = SnapGenUNet.from_pretrained(Path(run_quietly(student_cfg)["final"]) / "unet")
    assert student.unet_config.in_channels == 8


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("lora", [False, True], ids=["ema-and-text", "lora"])
def test_a_trainer_checkpoint_is_written_as_the_final_that_step_would_have_saved(
    tmp_path: Path, shapes: tuple[Path, Path], teachers: dict[str, Path], lora: bool
) -> None:
    from training_tools.models import final_from_checkpoint

    data, cache = shapes
    extra: dict[str, object] = {"checkpoint_every": 3, "keep_checkpoints": 3, "optim.lr": 5e-3}
    if lora:
        extra |= {"model.unet_path": str(teachers["snapgen"]), "lora.rank": 4, "model.train_text": False}
    else:
        extra |= {"optim.ema": True, "optim.ema_decay": 0.9, "model.train_text": True}
    cfg = base_config(tmp_path, data, cache, stage="finetune" if lora else "pretrain", max_steps=6, **extra)
    summary = run_quietly(cfg)
    final = Path(summary["final"])
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    last = final_from_checkpoint(checkpoints / "step-00000006", tmp_path / "from-6")
    early = final_from_checkpoint(checkpoints / "step-00000003", tmp_path / "from-3")
    for part in ("unet", "text_conditioner"):
        want, got = _weights(final / part), _weights(last / part)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), part
    assert (last / "model_index.json").read_text() == (final / "model_index.json").read_text()
    early_unet = _weights(early / "unet")
    assert any(not torch.equal(early_unet[k], v) for k, v in _weights(final / "unet").items())
    SnapGenUNet.from_pretrained(early / "unet")  # a plain diffusers component
    with pytest.raises(Exception, match="not a trainer checkpoint"):
        final_from_checkpoint(final, tmp_path / "nope")
