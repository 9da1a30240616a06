"""Memory and time estimate of a training run, computed before it starts (no weights allocated).

The student (and teacher) are built on the ``meta`` device and run once at the run's latent size:
``torch.utils.flop_counter.FlopCounterMode`` counts the forward FLOPs and a saved-tensors hook adds
up the bytes autograd keeps for the backward pass (the activations). Per process:

    memory = weights (4 B/param, fp32 master) + grads (4 B/trainable) + AdamW (8 B/trainable)
           + EMA (4 B/trainable) + frozen teacher (4 B/param) + activations * batch (in the compute
           dtype: bf16 under mixed precision) + 10 % allocator slack + a fixed runtime overhead
           (0.5 GiB: CUDA context / interpreter and libraries).

    time/step = batch * (3 * F_student + F_teacher_passes) / (device FLOP/s * efficiency)

with F the forward FLOPs at batch 1 (backward ~ 2x forward), teacher passes per stage (distill: 1;
step-distill: teacher_steps / student_steps + 3 for the discriminator; finetune with distillation: 1),
device FLOP/s measured with a matmul on the device (or given), and an efficiency of 0.4 (convolutions
and attention run below peak matmul speed). Gradient checkpointing keeps about a quarter of the
activations and adds one forward (4 * F instead of 3 * F).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from training_tools.precision import resolve_precision

GIB = 1024**3
RUNTIME_OVERHEAD_BYTES = GIB // 2
EFFICIENCY = 0.4


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Memory (bytes) and time per optimizer step (seconds) of a run on one process."""

    params: int
    trainable: int
    teacher_params: int
    activation_bytes: int
    memory_bytes: int
    flops_per_step: float
    device_flops: float
    seconds_per_step: float
    total_seconds: float
    latent_hw: tuple[int, int]
    batch_size: int

    def as_dict(self) -> dict[str, object]:
        """JSON-ready numbers with readable units."""
        return {
            "params_m": round(self.params / 1e6, 2),
            "trainable_m": round(self.trainable / 1e6, 2),
            "teacher_params_m": round(self.teacher_params / 1e6, 2),
            "activations_gib": round(self.activation_bytes / GIB, 3),
            "memory_gib": round(self.memory_bytes / GIB, 3),
            "tflops_per_step": round(self.flops_per_step / 1e12, 4),
            "device_tflops": round(self.device_flops / 1e12, 2),
            "seconds_per_step": round(self.seconds_per_step, 4),
            "total_hours": round(self.total_seconds / 3600, 3),
            "latent": list(self.latent_hw),
            "batch_size": self.batch_size,
        }


def _is_parameter_view(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return bool(base.is_leaf and base.requires_grad)


def measure_forward(
    build: Callable[[], nn.Module], call: Callable[[nn.Module], object], dtype: torch.dtype
) -> tuple[int, int, float]:
    """(params, saved activation bytes, forward FLOPs) of ``call(build())`` on the meta device."""
    with torch.device("meta"):
        model = nn.Module.to(build(), dtype)  # nn.Module.to: skip diffusers' dtype warning
    params = sum(p.numel() for p in model.parameters())
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if not _is_parameter_view(t):
            saved += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(model)
    return params, saved, float(counter.get_total_flops())


def measure_device_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 512) -> float:
    """Achieved matmul FLOP/s on ``device`` (a few ms of work)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * reps / max(time.perf_counter() - start, 1e-9)


def combine_estimate(
    *,
    params: int,
    trainable: int,
    activations_per_sample: int,
    student_flops: float,
    teacher_params: int,
    teacher_flops: float,
    teacher_passes: float,
    teacher_activations_per_sample: int,
    batch_size: int,
    gradient_checkpointing: bool,
    device_flops: float,
    max_steps: int,
    latent_hw: tuple[int, int],
) -> Estimate:
    """Apply the formula of the module docstring to measured numbers."""
    activations = activations_per_sample * batch_size
    if gradient_checkpointing:
        activations //= 4
    activations += teacher_activations_per_sample * batch_size
    state = 4 * params + (4 + 8 + 4) * trainable + 4 * teacher_params
    memory = int((state + activations) * 1.1) + RUNTIME_OVERHEAD_BYTES
    student_factor = 4.0 if gradient_checkpointing else 3.0
    flops = batch_size * (student_factor * student_flops + teacher_passes * teacher_flops)
    seconds = flops / (device_flops * EFFICIENCY)
    return Estimate(
        params=params,
        trainable=trainable,
        teacher_params=teacher_params,
        activation_bytes=activations,
        memory_bytes=memory,
        flops_per_step=flops,
        device_flops=device_flops,
        seconds_per_step=seconds,
        total_seconds=seconds * max_steps,
        latent_hw=latent_hw,
        batch_size=batch_size,
    )


def available_memory(device: torch.device) -> int:
    """Bytes one process can use: the GPU's total memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    import psutil

    return int(psutil.virtual_memory().available)


# --- the estimate of a whole run ----------------------------------------------------------------


def _text_shape(cfg: Any) -> tuple[int, int, int]:
    """(tokens, context_dim, pooled_dim) of the run's text conditioning, read from configs only."""
    import json
    from pathlib import Path

    from snapgen_app.config import TextConditionerConfig
    from training_tools.models import student_unet_config
    from training_tools.text import default_conditioner_config

    m = cfg.model
    if m.text_path:
        raw = json.loads((Path(m.text_path) / "config.json").read_text())
        text = TextConditionerConfig.from_dict(raw["conditioner_config"])
    else:
        text = default_conditioner_config(student_unet_config(m), m.text_max_length, m.text_dropout)
    return text.num_tokens, text.context_dim, text.pooled_dim


def _latent_geometry(cfg: Any) -> tuple[int, int]:
    """(latent channels, scale factor) of the run's autoencoder, from its config only."""
    import json
    from pathlib import Path

    from snapgen_app.config import AutoencoderConfig
    from snapgen_app.model.autoencoder import autoencoder_preset

    m = cfg.model
    if m.autoencoder_path:
        raw = json.loads((Path(m.autoencoder_path) / "config.json").read_text())
        ae = AutoencoderConfig.from_dict(
            {
                "latent_channels": raw["latent_channels"],
                "scaling_factor": raw["scaling_factor"],
                "shift_factor": raw["shift_factor"],
                "encoder": raw.get("encoder_config") or {"latent_channels": raw["latent_channels"]},
                "decoder": raw.get("decoder_config") or {"latent_channels": raw["latent_channels"]},
            }
        )
    else:
        ae = autoencoder_preset(m.autoencoder_preset)
    return ae.latent_channels, ae.scale_factor


def _teacher_builder(cfg: Any, student_build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    from training_tools import teachers

    t = cfg.teacher
    if not t.path:
        return lambda: teachers.SnapGenTeacher(student_build(), t.feature_layers)
    if t.kind == "snapgen":
        from snapgen_app.model.unet import SnapGenUNet

        config = SnapGenUNet.load_config(t.path)
        return lambda: teachers.SnapGenTeacher(SnapGenUNet.from_config(config), t.feature_layers)
    if t.kind == "unet2d":
        from diffusers import UNet2DConditionModel

        config = UNet2DConditionModel.load_config(t.path)
        return lambda: teachers.UNet2DTeacher(UNet2DConditionModel.from_config(config), t.feature_layers)
    from diffusers import SD3Transformer2DModel

    config = SD3Transformer2DModel.load_config(t.path)
    return lambda: teachers.SD3Teacher(SD3Transformer2DModel.from_config(config), t.feature_layers)


def _lora_trainable(model: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def estimate_run(cfg: Any, device: torch.device, device_tflops: float | None = None) -> Estimate:
    """Estimate memory and time of the run ``cfg`` (a TrainConfig) on ``device`` at data.resolution.

    ``device_tflops`` replaces the measured matmul speed (to estimate for another machine).
    """
    from snapgen_app.model.unet import SnapGenUNet
    from training_tools.models import check_latent_space, student_unet_config

    channels, factor = _latent_geometry(cfg)
    ucfg = student_unet_config(cfg.model, channels)
    multiple = factor * ucfg.latent_multiple
    if cfg.data.resolution % multiple != 0:
        from snapgen_app.errors import TrainingError

        raise TrainingError(
            f"data.resolution {cfg.data.resolution} is not a multiple of {multiple} "
            f"(autoencoder {factor}x times the UNet's {ucfg.latent_multiple}x)",
            hint="pick a resolution that is a multiple of that number",
        )
    check_latent_space(channels, ucfg)
    side = cfg.data.resolution // factor
    tokens, context_dim, pooled_dim = _text_shape(cfg)
    dtype = torch.float32 if resolve_precision(cfg.mixed_precision, device)[0] == "no" else torch.bfloat16
    use_pooled = ucfg.pooled_dim > 0

    def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = torch.zeros(1, channels, side, side, device="meta", dtype=dtype)
        t = torch.zeros(1, device="meta", dtype=dtype)
        ctx = torch.zeros(1, tokens, context_dim, device="meta", dtype=dtype)
        pooled = torch.zeros(1, pooled_dim, device="meta", dtype=dtype) if use_pooled else None
        return x, t, ctx, pooled

    def student_build() -> nn.Module:
        return SnapGenUNet.from_unet_config(ucfg)

    def student_call(model: nn.Module) -> object:
        x, t, ctx, pooled = inputs()
        return model(x, t, ctx, pooled)

    params, acts, flops = measure_forward(student_build, student_call, dtype)
    trainable = params
    if cfg.stage == "finetune" and cfg.lora.rank > 0:
        with torch.device("meta"):
            trainable = _lora_trainable(student_build(), cfg.lora.rank, cfg.lora.target_modules)
    t_params, t_flops, t_passes, t_acts = 0, 0.0, 0.0, 0
    if cfg.uses_teacher:
        build = _teacher_builder(cfg, student_build)
        with torch.device("meta"):  # pairing check from the configs alone, before any work
            build().check_student(channels, context_dim, pooled_dim)  # type: ignore[operator]

        def teacher_call(model: nn.Module) -> object:
            x, t, ctx, pooled = inputs()
            if pooled is None:
                pooled = torch.zeros(1, max(1, pooled_dim), device="meta", dtype=dtype)
            return model(x.requires_grad_(True), t, ctx, pooled if getattr(model, "pooled_dim", 0) else None)

        t_params, t_saved, t_flops = measure_forward(build, teacher_call, dtype)
        if cfg.stage == "step-distill":
            sd = cfg.step_distill
            t_passes = sd.teacher_steps / sd.student_steps
            if sd.adv_weight > 0:
                t_passes += (
                    5.0  # generator pass through the teacher (fwd + bwd) + real/fake discriminator pass
                )
                t_acts = t_saved
        else:
            t_passes = 1.0
    if device_tflops is not None and device_tflops > 0:
        device_flops = device_tflops * 1e12
    else:
        device_flops = measure_device_flops(
            device, torch.bfloat16 if device.type == "cuda" else torch.float32
        )
    return combine_estimate(
        params=params,
        trainable=trainable,
        activations_per_sample=acts,
        student_flops=flops,
        teacher_params=t_params,
        teacher_flops=t_flops,
        teacher_passes=t_passes,
        teacher_activations_per_sample=t_acts,
        batch_size=cfg.batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        device_flops=device_flops,
        max_steps=cfg.max_steps,
        latent_hw=(side, side),
    )
