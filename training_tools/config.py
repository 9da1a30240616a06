"""One frozen ``TrainConfig`` per run, saved as ``run_dir/train_config.json``.

The config is the whole recipe: stage, data, student/teacher, optimiser, loss weights, step
distillation, LoRA, checkpointing and sampling. Unknown keys are an error (``ConfigBase``); a resumed
run must be started with the same config as the saved one (only fields listed in
:data:`RESUMABLE_CHANGES` may differ). Torch-free so the app can build and validate one.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from snapgen_app.config import ConfigBase, require

Stage = Literal["pretrain", "distill", "step-distill", "finetune"]
STAGES: tuple[str, ...] = ("pretrain", "distill", "step-distill", "finetune")

# Fields that may differ between the saved config and the one given at resume time: they do not
# change the math of the steps already taken (more steps, another export or sample cadence).
# ``optim.decay_from`` only shapes the learning rate of steps still to come (a cooldown added to a
# run that is stopped and continued); ``seed`` only the noise and batches of steps still to come
# (after a divergence the same seed would replay the same steps from the healthy checkpoint).
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"max_steps", "sample_every", "log_every", "checkpoint_every", "optim.decay_from", "seed"}
)


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Where the pictures are and how they become latents.

    ``path``: a folder of images with same-name ``.txt`` captions or a ``metadata.jsonl``
    (``{"file_name": ..., "text": ...}`` per line, the diffusers image-folder convention).
    ``resolution``: side of the square center crop, or the pixel budget (resolution**2) of each
    aspect bucket when ``buckets`` is true. Latents and text embeddings are cached under
    ``cache_dir`` (default ``run_dir/cache``) as safetensors shards.
    """

    path: str = ""
    resolution: int = 256
    buckets: bool = False
    bucket_step: int = 64
    cache_dir: str = ""
    shard_size: int = 256
    caption_extension: str = ".txt"

    def validate(self) -> None:
        require(self.resolution >= 16, "data.resolution", f"{self.resolution} is too small", allowed=">= 16")
        require(
            self.bucket_step >= 8 and self.bucket_step % 8 == 0, "data.bucket_step", "must be a multiple of 8"
        )
        require(self.resolution % 8 == 0, "data.resolution", f"{self.resolution} is not a multiple of 8")
        require(self.shard_size >= 1, "data.shard_size", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelSourceConfig(ConfigBase):
    """The student (and its autoencoder / text side).

    Either a preset name of ``snapgen_app.model.presets`` / ``autoencoder_preset`` or a
    diffusers-layout directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) to start
    from. The text side is ``text_path`` (a saved ``TextProjection`` folder: its config names the
    frozen encoders) or, when empty, the built-in MiniLM encoder padded to ``text_max_length``
    tokens with fresh projections to the UNet's context width and pooled size; each encoder is
    dropped with probability ``text_dropout`` during training (independently per encoder).
    ``train_text`` false freezes the projections (usual for step distillation and LoRA fine-tuning).
    """

    unet_preset: str = "tiny"
    unet_path: str = ""
    autoencoder_preset: str = "tiny"
    autoencoder_path: str = ""
    text_path: str = ""
    text_max_length: int = 32
    text_dropout: float = 0.1
    train_text: bool = True
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        require(
            bool(self.unet_preset) or bool(self.unet_path),
            "model.unet_preset",
            "give a preset or model.unet_path",
        )
        require(2 <= self.text_max_length <= 512, "model.text_max_length", "out of range", allowed="2-512")
        require(0.0 <= self.text_dropout < 1.0, "model.text_dropout", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TeacherConfig(ConfigBase):
    """The frozen teacher for distillation and fine-tuning regularisation.

    ``kind``: ``snapgen`` (a SnapGenUNet directory), ``unet2d`` (diffusers UNet2DConditionModel),
    ``sd3`` (diffusers SD3Transformer2DModel). ``path`` is its diffusers-layout directory; empty for
    ``finetune`` means "the student's starting weights" (the base model is the teacher).
    The teacher reads the same text tokens as the student, so its cross-attention width must equal
    the student's context width (checked, with a clear error).
    """

    kind: Literal["snapgen", "unet2d", "sd3"] = "snapgen"
    path: str = ""
    feature_layers: int = 3

    def validate(self) -> None:
        require(1 <= self.feature_layers <= 8, "teacher.feature_layers", "out of range", allowed="1-8")


@dataclasses.dataclass(frozen=True)
class OptimConfig(ConfigBase):
    """AdamW + linear warm-up + constant (or cosine) schedule + EMA + clipping + accumulation.

    ``decay_from`` > 0: a cooldown, the learning rate falls from its scheduled value to 0 on a
    half cosine between that step and ``max_steps`` (warmup-stable-decay). A run stopped on time
    is continued with it to end at a decayed learning rate.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    ema: bool = True
    decay_from: int = 0
    # Stop a run whose task loss stays above divergence_factor x its recent median for
    # divergence_patience steps in a row (or is not finite), without a checkpoint of the blown-up
    # weights (training_tools.divergence). 0 = never.
    divergence_factor: float = 4.0
    divergence_patience: int = 30

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", f"{self.lr} must be positive")
        require(
            self.divergence_factor == 0 or self.divergence_factor > 1,
            "optim.divergence_factor",
            "must be 0 (off) or above 1",
        )
        require(self.divergence_patience >= 1, "optim.divergence_patience", "must be >= 1")
        require(self.decay_from >= 0, "optim.decay_from", "must be >= 0")
        require(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
        require(0.0 <= self.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class FlowConfig(ConfigBase):
    """Flow-matching timestep sampling: t = sigmoid(mean + std * n), then the SD3 shift.

    ``shift`` 0 means "resolution-dependent": s = sqrt(latent pixels / base_latent_pixels)
    (SD3's resolution shift, base 64x64 latent = 512 px); any positive value is used as is.
    The same shift is used for the periodic samples and the step-distillation schedule.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 0.0
    base_latent_pixels: int = 64 * 64

    def validate(self) -> None:
        require(self.logit_std > 0, "flow.logit_std", "must be positive")
        require(self.shift >= 0, "flow.shift", "must be >= 0 (0 = resolution-dependent)")


@dataclasses.dataclass(frozen=True)
class KDConfig(ConfigBase):
    """Multi-level knowledge distillation and its timestep-aware scaling.

    ``scaling``: ``timestep_aware`` (the paper's S), ``sum`` (task + out_weight*L_out +
    feat_weight*L_feat, unscaled) or ``kd_only`` (only the distillation terms). Fine-tuning always
    adds its regulariser (``lora.distill_weight``) as a plain sum: see the trainer.
    """

    output_weight: float = 1.0
    feature_weight: float = 1.0
    scaling: Literal["timestep_aware", "sum", "kd_only"] = "timestep_aware"

    def validate(self) -> None:
        require(self.output_weight >= 0 and self.feature_weight >= 0, "kd", "weights must be >= 0")


@dataclasses.dataclass(frozen=True)
class StepDistillConfig(ConfigBase):
    """Adversarial (diffusion-GAN) step distillation to ``student_steps`` Euler steps.

    The distillation target of step k is the teacher's ``teacher_steps``-step Euler integration
    over the same interval (t_k -> t_{k+1}); the discriminator is ``disc_*`` heads on the frozen
    teacher's intermediate features at re-noised samples.
    """

    student_steps: int = 4
    teacher_steps: int = 28
    adv_weight: float = 0.1
    # Classifier-free guidance of the teacher's targets: 1 = the unguided teacher; > 1 bakes guidance
    # into the student, which then samples with one network call per step and no CFG (the paper).
    teacher_guidance: float = 1.0
    gan_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_lr: float = 1e-4
    disc_hidden: int = 64
    # Where the adversarial term re-noises the student's x0 estimate (and the real latents): the
    # logit-normal mean of that time (None = flow.logit_mean). Lower = less noise, more detail seen.
    adv_logit_mean: float | None = None

    def validate(self) -> None:
        require(1 <= self.student_steps <= 16, "step_distill.student_steps", "out of range", allowed="1-16")
        require(
            self.teacher_steps >= self.student_steps,
            "step_distill.teacher_steps",
            "must be >= student_steps",
        )
        require(self.adv_weight >= 0, "step_distill.adv_weight", "must be >= 0")
        require(self.teacher_guidance >= 1.0, "step_distill.teacher_guidance", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class LoraConfig(ConfigBase):
    """Fine-tuning: LoRA through peft (``rank`` > 0) or full fine-tuning (``rank`` 0)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
    distill_weight: float = 1.0

    def validate(self) -> None:
        require(self.rank >= 0, "lora.rank", "must be >= 0 (0 = full fine-tuning)")
        require(len(self.target_modules) > 0 or self.rank == 0, "lora.target_modules", "empty")


@dataclasses.dataclass(frozen=True)
class SampleConfig(ConfigBase):
    """Periodic sample images from fixed prompts and seeds (Euler on the model + decoder)."""

    prompts: tuple[str, ...] = ("a red circle on a white background",)
    seeds: tuple[int, ...] = (0,)
    steps: int = 28
    guidance_scale: float = 1.0
    resolution: int = 0  # 0 = data.resolution

    def validate(self) -> None:
        require(1 <= self.steps <= 100, "sample.steps", "out of range", allowed="1-100")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Everything one training run needs. Saved as ``run_dir/train_config.json``."""

    stage: Stage = "pretrain"
    run_dir: str = ""
    seed: int = 0
    batch_size: int = 8
    max_steps: int = 1000
    # "auto": bf16 autocast on GPUs and on CPUs with bf16 kernels, fp32 on other CPUs (precision.py).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelSourceConfig = ModelSourceConfig()
    teacher: TeacherConfig = TeacherConfig()
    optim: OptimConfig = OptimConfig()
    flow: FlowConfig = FlowConfig()
    kd: KDConfig = KDConfig()
    step_distill: StepDistillConfig = StepDistillConfig()
    lora: LoraConfig = LoraConfig()
    sample: SampleConfig = SampleConfig()
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0
    log_every: int = 1
    max_memory_gb: float = 0.0  # 0 = what the device reports
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    export: bool = False

    def validate(self) -> None:
        require(self.stage in STAGES, "stage", f"{self.stage!r} is not a stage", allowed=list(STAGES))
        require(bool(self.run_dir), "run_dir", "is required (a new or resumable run directory)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.max_steps >= 1, "max_steps", "must be >= 1")
        require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = only at the end)")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(bool(self.data.path), "data.path", "is required (a folder of images with captions)")
        if self.stage in ("distill", "step-distill"):
            require(bool(self.teacher.path), "teacher.path", f"stage {self.stage} needs a teacher directory")

    @property
    def uses_teacher(self) -> bool:
        """True for the stages that run a frozen teacher (finetune uses the base model)."""
        return self.stage in ("distill", "step-distill") or (
            self.stage == "finetune" and self.lora.distill_weight > 0
        )


def config_differences(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """Dotted names of fields that differ between two configs, ignoring RESUMABLE_CHANGES."""

    def flat(prefix: str, value: object) -> dict[str, object]:
        if isinstance(value, dict):
            out: dict[str, object] = {}
            for key, sub in value.items():
                out.update(flat(f"{prefix}{key}.", sub))
            return out
        return {prefix.rstrip("."): value}

    a, b = flat("", saved.to_dict()), flat("", given.to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
