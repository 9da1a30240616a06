"""Building the student side (UNet, autoencoder, text), the teacher, LoRA, and the final checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from snapgen_app.config import UNetConfig
from snapgen_app.errors import TrainingError
from snapgen_app.model.autoencoder import SnapGenAutoencoder, autoencoder_preset
from snapgen_app.model.presets import unet_preset
from snapgen_app.model.unet import SnapGenUNet
from training_tools.config import LoraConfig, ModelSourceConfig, TrainConfig
from training_tools.teachers import SnapGenTeacher, Teacher, load_teacher
from training_tools.text import TextStep, build_text_step


@dataclasses.dataclass
class StudentParts:
    """What a run trains and uses: the UNet (maybe LoRA-wrapped later), the autoencoder, the text step."""

    unet: nn.Module
    autoencoder: SnapGenAutoencoder
    text: TextStep
    unet_config: UNetConfig


def _require_weights(folder: Path, what: str) -> None:
    if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
        raise TrainingError(
            f"{what} directory {folder} needs config.json and a .safetensors file",
            hint="point it at a diffusers-layout component folder (pickle weights are refused)",
        )


def student_unet_config(model: ModelSourceConfig, latent_channels: int | None = None) -> UNetConfig:
    """The student's architecture (from the checkpoint's config.json or the preset), without weights.

    A preset names an architecture, not a latent space: with ``latent_channels`` it takes and
    predicts that many channels (the autoencoder's). A checkpoint keeps the channels it was trained with.
    """
    if model.unet_path:
        folder = Path(model.unet_path)
        _require_weights(folder, "model.unet_path")
        raw = json.loads((folder / "config.json").read_text())
        return UNetConfig.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})
    config = unet_preset(model.unet_preset)
    if latent_channels is not None:
        config = config.replace(in_channels=latent_channels, out_channels=latent_channels)
    return config


def check_latent_space(latent_channels: int, unet_config: UNetConfig) -> None:
    """Raise TrainingError unless the UNet takes the autoencoder's latent channels."""
    if latent_channels != unet_config.in_channels:
        raise TrainingError(
            f"the autoencoder makes {latent_channels}-channel latents but the UNet takes "
            f"{unet_config.in_channels} channels",
            hint="use an autoencoder and UNet checkpoint of the same latent space",
        )


def build_student_parts(cfg: TrainConfig) -> StudentParts:
    """Student UNet, autoencoder and text step as the config says; checks their latent spaces agree."""
    m = cfg.model
    if m.autoencoder_path:
        _require_weights(Path(m.autoencoder_path), "model.autoencoder_path")
        autoencoder = SnapGenAutoencoder.from_pretrained(m.autoencoder_path, use_safetensors=True)
    else:
        autoencoder = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset(m.autoencoder_preset))
    autoencoder.eval().requires_grad_(False)
    latent = autoencoder.autoencoder_config.latent_channels
    if m.unet_path:
        _require_weights(Path(m.unet_path), "model.unet_path")
        unet = SnapGenUNet.from_pretrained(m.unet_path, use_safetensors=True)
    else:
        unet = SnapGenUNet.from_unet_config(student_unet_config(m, latent))
    ucfg = unet.unet_config
    check_latent_space(latent, ucfg)
    if cfg.data.resolution % (autoencoder.scale_factor * ucfg.latent_multiple) != 0:
        raise TrainingError(
            f"data.resolution {cfg.data.resolution} is not a multiple of {autoencoder.scale_factor * ucfg.latent_multiple} "
            f"(autoencoder {autoencoder.scale_factor}x times the UNet's {ucfg.latent_multiple}x)",
            hint="pick a resolution that is a multiple of that number",
        )
    text = build_text_step(ucfg, m.text_path, m.text_max_length, m.text_dropout)
    return StudentParts(unet=unet, autoencoder=autoencoder, text=text, unet_config=ucfg)


def load_teacher_for(cfg: TrainConfig, parts: StudentParts) -> Teacher:
    """The teacher of the run: ``teacher.path``, or for fine-tuning a frozen copy of the base model."""
    if cfg.teacher.path:
        return load_teacher(cfg.teacher.kind, cfg.teacher.path, cfg.teacher.feature_layers)
    return SnapGenTeacher(copy.deepcopy(parts.unet), cfg.teacher.feature_layers)


def apply_lora(unet: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap the UNet with peft LoRA adapters on ``lora.target_modules``; only they train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()}
    missing = [t for t in lora.target_modules if t.rsplit(".", 1)[-1] not in names]
    if missing:
        raise TrainingError(
            f"lora.target_modules {missing} match no layer of the UNet",
            hint="SnapGen attention layers are named to_q, to_k, to_v, to_out; FFN: proj_in, proj_out",
        )
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    return get_peft_model(unet, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base layers (peft ``merge_and_unload``): a plain SnapGenUNet again."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_final(
    final_dir: Path, unet: nn.Module, text: TextStep, parts: StudentParts, cfg: TrainConfig
) -> Path:
    """Write the trained model as the checkpoint ``snapgen export`` reads (atomically: a temporary
    folder renamed into place): model_index.json (with the generation defaults of this run), unet/,
    autoencoder/, text_conditioner/ (each config.json + safetensors) and train_config.json.
    """
    from snapgen_app.model.export import BundleDefaults, write_checkpoint
    from training_tools.samples import sampling_shift

    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    res = cfg.sample.resolution or cfg.data.resolution
    side = res // parts.autoencoder.scale_factor
    shift = sampling_shift(cfg, side, side)
    steps = cfg.step_distill.student_steps if cfg.stage == "step-distill" else cfg.sample.steps
    defaults = BundleDefaults(
        steps=steps, width=res, height=res, shift=shift, guidance_scale=cfg.sample.guidance_scale
    )
    write_checkpoint(
        tmp, unet=unet, autoencoder=parts.autoencoder, text_conditioner=text.conditioner, defaults=defaults
    )
    cfg.save(tmp / "train_config.json")
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp.rename(final_dir)
    return final_dir


def final_from_checkpoint(checkpoint: Path, final_dir: Path) -> Path:
    """Write a trainer checkpoint (``RUN/checkpoints/step-N``) as the final checkpoint that run would
    have saved at that step (EMA weights when the run keeps an EMA): what ``snapgen export`` and the
    evals read, so a run in progress, or one of its earlier checkpoints, can be exported or scored.
    """
    from training_tools import checkpoint as ckpt
    from training_tools.ema import EMA

    checkpoint = Path(checkpoint)
    config_file = checkpoint.parent.parent / "train_config.json"
    if not (checkpoint / ckpt.STATE_FILE).is_file() or not config_file.is_file():
        raise TrainingError(
            f"{checkpoint} is not a trainer checkpoint of a run",
            hint="give RUN/checkpoints/step-N (next to it RUN/train_config.json)",
        )
    cfg = TrainConfig.load(config_file)
    torch.manual_seed(cfg.seed)  # as the trainer's rank 0: fresh, untrained parts start the same
    parts = build_student_parts(cfg)
    lora = cfg.stage == "finetune" and cfg.lora.rank > 0
    if lora:
        parts.unet = apply_lora(parts.unet, cfg.lora)
    parts.unet.load_state_dict(ckpt.read_group(checkpoint, "module-unet"), strict=False)
    parts.text.load_state_dict(ckpt.read_group(checkpoint, "module-text"), strict=False)
    averaged = ckpt.read_group(checkpoint, "ema")
    if averaged:  # the trainer's own EMA: names checked, copied as at the end of a run
        ema = EMA(parts.unet, cfg.optim.ema_decay)
        ema.load_state_tensors(averaged, 0)
        ema.copy_to(parts.unet)
    unet = merge_lora(parts.unet) if lora else parts.unet
    return save_final(final_dir, unet, parts.text, parts, cfg)
