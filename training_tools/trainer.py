"""The training loop for every stage, on Hugging Face Accelerate.

One :class:`Trainer` runs ``pretrain`` (flow matching from scratch), ``distill`` (multi-level KD from
a teacher with timestep-aware scaling), ``step-distill`` (adversarial step distillation to a few
Euler steps) and ``finetune`` (LoRA or full, the base model as teacher). The same code runs single
process on a CPU and under ``accelerate launch`` on many GPUs / nodes: Accelerate owns the process
group, DDP wrapping, mixed precision (autocast) and gradient accumulation.

Determinism and exact resume: every random draw of step s (timesteps, noise, text dropout) comes
from a generator seeded by (seed, s, micro-step, rank); data order is a function of (seed, epoch);
checkpoints hold model, EMA, optimizers, LR schedule, data position and the global RNG states. So
N steps in one go and N/2 + resume + N/2 give the same losses.
"""

from __future__ import annotations

import copy
import importlib
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapgen_app.errors import Cancelled, TrainingError
from snapgen_app.model.autoencoder import SnapGenAutoencoder
from snapgen_app.progress import EtaEstimator
from training_tools import checkpoint as ckpt
from training_tools import flow, losses
from training_tools.config import TrainConfig
from training_tools.data import (
    DataPosition,
    LatentCache,
    batch_stream,
    build_cache,
    collate,
    module_fingerprint,
    scan_folder,
)
from training_tools.discriminator import FeatureDiscriminator
from training_tools.divergence import DivergenceWatch
from training_tools.ema import EMA
from training_tools.estimate import Estimate, available_memory, estimate_run
from training_tools.events import EventWriter
from training_tools.models import (
    StudentParts,
    apply_lora,
    build_student_parts,
    load_teacher_for,
    merge_lora,
    save_final,
)
from training_tools.precision import resolve_precision
from training_tools.rundir import prepare_run_dir
from training_tools.samples import sampling_shift, write_samples
from training_tools.teachers import Feature, Teacher

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where the trainer asks AdamW for its fused kernel


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-step: all of its random draws, reproducible from the numbers alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + micro * 101 + rank) % (2**63 - 1))


def lr_lambda(warmup: int, total: int, kind: str, decay_from: int = 0) -> Any:
    """LR multiplier per optimizer step: linear warm-up, then constant or cosine to 0; with
    ``decay_from`` > 0 also a half-cosine cooldown to 0 from that step to ``total``."""

    def cosine(progress: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        base = cosine((step - warmup) / max(1, total - warmup)) if kind == "cosine" else 1.0
        if 0 < decay_from <= step:
            base *= cosine((step - decay_from) / max(1, total - decay_from))
        return base

    return factor


TEARDOWN_TIMEOUT_S = 60.0


def end_training(accelerator: Any, events: EventWriter, timeout_s: float = TEARDOWN_TIMEOUT_S) -> bool:
    """``accelerator.end_training()`` with a time bound; False when it did not return in time.

    In a multi-process run it destroys the process group, which now and then never returns on one
    rank (pytorch/pytorch#75097; seen here twice in the two-process CPU test: the run had finished
    and saved, one rank stayed on a futex). By then everything is saved, so a rank is not kept alive
    for it: the teardown runs in a daemon thread, and on a timeout the caller (``python -m
    training_tools``) leaves at once with ``os._exit``. A single process tears down in line.
    """
    if accelerator.num_processes == 1:
        accelerator.end_training()
        return True
    done = threading.Event()

    def teardown() -> None:
        accelerator.end_training()
        done.set()

    threading.Thread(target=teardown, name="end-training", daemon=True).start()
    if done.wait(timeout_s):
        return True
    events.emit(
        "log",
        message=f"process-group teardown still waiting after {timeout_s:.0f} s (torch issue 75097); "
        "everything is saved, leaving without it",
    )
    return False


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it.

    ``stop_after``: stop (with a checkpoint, like SIGTERM) once this many optimizer steps are done;
    used to test exact resume and by callers that train in slices.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        dry_run: bool = False,
        stop_after: int | None = None,
        max_seconds: float | None = None,
        device_tflops: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.device_tflops = device_tflops
        self.resume = resume
        self.dry_run = dry_run
        self.stop_after = stop_after
        # A time budget for this process's training loop: at the first step boundary past it the run
        # stops with a checkpoint (like SIGTERM), and progress events count their ETA against it.
        self.max_seconds = max_seconds
        self._deadline: float | None = None
        self._stop_requested = False
        self.teardown_hung = False  # set by run() when the process group's teardown did not return
        self.precision, self.precision_reason = "", ""  # set with the accelerator (precision.py)

    # -- set-up ---------------------------------------------------------------------------------

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        device = "cuda" if torch.cuda.is_available() else "cpu"
        precision, self.precision_reason = resolve_precision(self.cfg.mixed_precision, device)
        self.precision = precision
        return Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=self.cfg.optim.grad_accum,
            cpu=not torch.cuda.is_available(),
            # LoRA wrappers and the step-distillation pair can leave parameters out of a forward pass.
            kwargs_handlers=[
                DistributedDataParallelKwargs(
                    find_unused_parameters=self.cfg.stage in ("step-distill", "finetune")
                )
            ],
        )

    def estimate(self, device: torch.device) -> Estimate:
        """The memory / time estimate of this run (meta-device models, nothing allocated)."""
        return estimate_run(self.cfg, device, self.device_tflops)

    def check_memory(self, est: Estimate, device: torch.device) -> None:
        """Refuse a run whose estimate exceeds the memory of one process."""
        limit = (
            int(self.cfg.max_memory_gb * 1024**3) if self.cfg.max_memory_gb > 0 else available_memory(device)
        )
        if est.memory_bytes > limit:
            raise TrainingError(
                f"resolution {self.cfg.data.resolution} px with batch {self.cfg.batch_size} needs about "
                f"{est.memory_bytes / 1024**3:.2f} GiB per process (weights+optimizer "
                f"{(est.memory_bytes - est.activation_bytes) / 1024**3:.2f} GiB, activations "
                f"{est.activation_bytes / 1024**3:.2f} GiB) but {limit / 1024**3:.2f} GiB are available",
                hint="lower data.resolution or batch_size (with optim.grad_accum to keep the effective batch), "
                "enable model.gradient_checkpointing, or use a device with more memory",
            )

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the whole stage (or only the estimate for a dry run); returns a summary dict."""
        cfg = self.cfg
        if cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        accelerator = self._accelerator()
        main = accelerator.is_main_process
        device = accelerator.device
        est = self.estimate(device)
        if self.dry_run:
            events = EventWriter(cfg.stage, None, enabled=main)
            try:
                self.check_memory(est, device)
            finally:
                _release_accelerate_state(accelerator)
            events.emit(
                "log", message=_estimate_message(est), data={"estimate": est.as_dict(), "dry_run": True}
            )
            return {"estimate": est.as_dict()}
        try:
            self.check_memory(est, device)
        except TrainingError:
            _release_accelerate_state(accelerator)
            raise

        run_dir = prepare_run_dir(cfg, self.resume) if main else Path(cfg.run_dir)
        accelerator.wait_for_everyone()
        events = EventWriter(cfg.stage, run_dir / "events.jsonl", enabled=main)
        events.emit(
            "started",
            total=cfg.max_steps,
            message=_estimate_message(est),
            data={"estimate": est.as_dict(), "processes": accelerator.num_processes},
        )
        events.emit(
            "log",
            message=f"precision: {self.precision_reason}",
            data={"mixed_precision": self.precision, "requested": cfg.mixed_precision},
        )
        try:
            return self._train(accelerator, run_dir, events, est)
        except Cancelled as exc:
            events.emit("cancelled", message=str(exc))
            raise
        except Exception as exc:
            events.emit("error", message=str(exc))
            raise
        finally:
            _release_accelerate_state(accelerator)

    def _train(self, accelerator: Any, run_dir: Path, events: EventWriter, est: Estimate) -> dict[str, Any]:
        cfg = self.cfg
        rank, world = accelerator.process_index, accelerator.num_processes
        main = accelerator.is_main_process
        torch.manual_seed(cfg.seed + rank)
        parts = build_student_parts(cfg)
        cache = self._build_cache(accelerator, run_dir, parts, events)

        teacher = load_teacher_for(cfg, parts) if cfg.uses_teacher else None
        # The teacher reads text through a frozen copy of the text projections as they were at the start.
        teacher_text = parts.text.frozen_copy() if teacher else None
        if cfg.stage == "finetune" and cfg.lora.rank > 0:
            parts.unet = apply_lora(parts.unet, cfg.lora)
        if cfg.model.gradient_checkpointing:
            base = parts.unet.get_base_model() if hasattr(parts.unet, "get_base_model") else parts.unet
            base.enable_gradient_checkpointing()

        probe = self._probe(parts, teacher, teacher_text, cache)
        projector = None
        if cfg.stage == "distill" and cfg.kd.feature_weight > 0:
            projector = losses.FeatureProjector(probe["student_dim"], probe["teacher_dim"])
        disc = None
        if cfg.stage == "step-distill" and cfg.step_distill.adv_weight > 0:
            disc = FeatureDiscriminator(probe["disc_dims"], cfg.step_distill.disc_hidden)

        if not cfg.model.train_text:
            parts.text.conditioner.projection.requires_grad_(False)
        modules: dict[str, nn.Module] = {"unet": parts.unet, "text": parts.text}
        if projector is not None:
            modules["projector"] = projector
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        o = cfg.optim
        # The fused kernel (one pass per parameter tensor on CPU and CUDA) instead of the per-tensor
        # op loop: the same update up to float rounding.
        fused = accelerator.device.type in FUSED_ADAMW_DEVICES or None
        optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=fused
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.warmup_steps, cfg.max_steps, o.schedule, o.decay_from)
        )
        disc_opt = (
            torch.optim.AdamW(disc.parameters(), lr=cfg.step_distill.disc_lr, betas=(0.0, 0.99), fused=fused)
            if disc is not None
            else None
        )
        ema = EMA(parts.unet, o.ema_decay) if o.ema else None

        # Accelerate wraps every prepared module of a multi-process CPU run in DDP (it skips a
        # module with nothing to train on GPUs only), and DDP refuses such a module: the frozen text
        # projections of a KD or step-distillation student. Those get the same mixed-precision
        # forward and placement without DDP, in one process and in many.
        frozen = {n for n, m in modules.items() if not any(p.requires_grad for p in m.parameters())}
        names = [n for n in modules if n not in frozen]
        prepared = accelerator.prepare(*(modules[n] for n in names), optimizer)
        wrapped = dict(zip(names, prepared[: len(names)], strict=True))
        wrapped.update({n: accelerator.prepare_model(modules[n], evaluation_mode=True) for n in frozen})
        optimizer = prepared[-1]
        disc_wrapped = None
        if disc is not None:
            disc_wrapped, disc_opt = accelerator.prepare(disc, disc_opt)
        device = accelerator.device
        if teacher is not None:
            teacher.to(device)
            assert teacher_text is not None
            teacher_text.to(device)

        step, position = 0, DataPosition()
        root = run_dir / "checkpoints"
        if self.resume:
            latest = ckpt.latest(root)
            if latest is not None:
                step, position = self._load(
                    latest, modules, optimizer, scheduler, ema, disc, disc_opt, teacher_text, rank
                )
                events.emit("log", step=step, total=cfg.max_steps, message=f"resumed from {latest.name}")
            else:
                events.emit("log", message="no checkpoint yet: starting from step 0")

        self._install_sigterm()
        stream = batch_stream(cache, cfg.batch_size, cfg.seed, position, rank, world)
        eta = EtaEstimator(cfg.max_steps - step)
        started_at, window_start, window_samples = step, time.monotonic(), 0
        if self.max_seconds is not None:
            self._deadline = window_start + self.max_seconds
        ctx = _Context(
            cfg, accelerator, wrapped, parts, teacher, teacher_text, projector, disc, disc_wrapped, probe
        )
        last_terms: dict[str, float] = {}
        watch = DivergenceWatch(cfg.optim.divergence_factor, cfg.optim.divergence_patience)
        while step < cfg.max_steps:
            terms: dict[str, float] = {}
            for micro in range(cfg.optim.grad_accum):
                batch = {k: v.to(device) for k, v in collate(cache, next(stream)).items()}
                gen = _step_generator(cfg.seed, step, micro, rank)
                with accelerator.accumulate(*wrapped.values()):
                    loss, micro_terms = ctx.loss(batch, gen)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if disc_wrapped is not None and disc_opt is not None:
                        d_loss = ctx.disc_loss(batch, gen)
                        accelerator.backward(d_loss)
                        micro_terms["disc"] = float(d_loss.detach())
                        disc_opt.step()
                        disc_opt.zero_grad(set_to_none=True)
                for k, v in micro_terms.items():
                    terms[k] = terms.get(k, 0.0) + v / cfg.optim.grad_accum
                window_samples += batch["latents"].shape[0] * accelerator.num_processes
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(wrapped["unet"]))
            step += 1
            if world > 1:  # report the mean over processes, not rank 0's share
                keys = sorted(terms)
                mean = accelerator.reduce(
                    torch.tensor([terms[k] for k in keys], device=device), reduction="mean"
                )
                terms = dict(zip(keys, mean.tolist(), strict=True))
            last_terms = terms
            diverged = watch.update(step, terms["task"])
            stop = self._should_stop(accelerator, step)
            if main and (step % cfg.log_every == 0 or step == cfg.max_steps or stop or diverged):
                elapsed = max(time.monotonic() - window_start, 1e-9)
                events.emit(
                    "progress",
                    step=step,
                    total=cfg.max_steps,
                    eta_s=self._eta(eta, step - started_at),
                    data={
                        "loss": terms,
                        "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples / elapsed,
                    },
                )
                window_start, window_samples = time.monotonic(), 0
            if cfg.sample_every and step % cfg.sample_every == 0 and main:
                self._samples(accelerator, wrapped, parts, run_dir, step, events)
            if diverged:
                raise self._diverged(accelerator, watch, terms["task"], root)
            periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not watch.suspect
            if periodic or stop or step == cfg.max_steps:
                self._save(
                    accelerator,
                    root,
                    step,
                    position,
                    modules,
                    optimizer,
                    scheduler,
                    ema,
                    disc,
                    disc_opt,
                    teacher_text,
                )
            if stop:
                raise Cancelled(f"stopped after step {step} with a checkpoint; continue with --resume")

        accelerator.wait_for_everyone()
        summary: dict[str, Any] = {
            "steps": step,
            "loss": last_terms,
            "data": cache.report,
            "estimate": est.as_dict(),
        }
        if main:
            final = self._finish(accelerator, wrapped, parts, ema, run_dir)
            summary["final"] = str(final)
            summary["export"] = self._export(run_dir)
            events.emit("finished", step=step, total=cfg.max_steps, message=f"saved {final}", data=summary)
        accelerator.wait_for_everyone()
        self.teardown_hung = not end_training(accelerator, events)
        return summary

    # -- pieces -----------------------------------------------------------------------------------

    def _build_cache(
        self, accelerator: Any, run_dir: Path, parts: StudentParts, events: EventWriter
    ) -> LatentCache:
        cfg = self.cfg
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"

        def build() -> LatentCache:
            report = scan_folder(cfg.data.path, cfg.data.caption_extension)
            ae = parts.autoencoder
            fast: list[SnapGenAutoencoder] = []

            def encode(images: torch.Tensor) -> torch.Tensor:
                # The encoder's convolutions at full image size run about 2x faster on a CPU in
                # channels-last layout (emoji encoder, 128 px, fp32: 14.6 -> 7.1 ms an image; a
                # 3,000-image cache 54 -> 37 s; latents of std 1 differ by at most 1e-3, float
                # rounding). A copy, made once the cache needs encoding.
                if not fast:
                    fast.append(copy.deepcopy(ae).to(memory_format=torch.channels_last))
                return fast[0].encode(images.contiguous(memory_format=torch.channels_last))

            return build_cache(
                report,
                cache_dir,
                resolution=cfg.data.resolution,
                buckets=cfg.data.buckets,
                bucket_step=cfg.data.bucket_step,
                encode_images=encode,
                encode_text=parts.text.encode_frozen,
                encoder_id=module_fingerprint(ae) + parts.text.fingerprint,
                shard_size=cfg.data.shard_size,
            )

        if accelerator.is_main_process:
            cache = build()
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            cache = build()  # finds the main process's cache by fingerprint
        report = cache.report
        if report.get("captions_from_filename"):
            events.emit(
                "log",
                message=f"{report['captions_from_filename']} images have no caption file: their file names are used as captions",
                data={"data": report},
            )
        if report.get("skipped_images"):
            events.emit(
                "log", message=f"skipped {report['skipped_images']} unreadable images", data={"data": report}
            )
        events.emit(
            "log",
            message=f"dataset: {len(cache)} images, {len(cache.captions)} captions",
            data={"data": report},
        )
        return cache

    def _probe(
        self, parts: StudentParts, teacher: Teacher | None, teacher_text: nn.Module | None, cache: LatentCache
    ) -> dict[str, Any]:
        """One tiny forward to learn feature widths (for the projector and discriminator heads)."""
        latent = cache.latents[0][None]
        frozen = {k[5:]: v[:1] for k, v in collate(cache, [0]).items() if k.startswith("text.")}
        out: dict[str, Any] = {}
        use_pooled = parts.unet_config.pooled_dim > 0
        with torch.no_grad():
            tokens, pooled = parts.text(frozen, None)
            t = torch.full((1,), 0.5)
            _, feats = parts.unet(
                latent, t * 1000, tokens, pooled if use_pooled else None, return_features=True
            )
            if "kd_tokens" in feats:
                out["student_dim"] = int(feats["kd_tokens"].shape[-1])
            if teacher is not None and teacher_text is not None:
                teacher.check_student(int(latent.shape[1]), int(tokens.shape[-1]), int(pooled.shape[-1]))
                t_tokens, t_pooled = teacher_text(frozen, None)
                _, t_feats = teacher(latent, t, t_tokens, t_pooled)
                out["teacher_dim"] = int(t_feats[-1][0].shape[-1])
                out["disc_dims"] = [int(f.shape[-1]) for f, _ in t_feats]
        return out

    def _install_sigterm(self) -> None:
        """SIGTERM (and a first Ctrl-C) stop the run at the next step boundary with a checkpoint."""

        def handler(signum: int, _frame: object) -> None:
            self._stop_requested = True
            if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
                signal.signal(signal.SIGINT, signal.default_int_handler)

        try:
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. run inside a worker thread): no handler
            pass

    def _eta(self, eta: EtaEstimator, done: int) -> float | None:
        """Seconds left: from the steps to go, or from the time budget when that ends the run sooner."""
        by_steps = eta.eta(done)
        if self._deadline is None:
            return by_steps
        by_time = max(0.0, self._deadline - time.monotonic())
        return by_time if by_steps is None else min(by_steps, by_time)

    def _should_stop(self, accelerator: Any, step: int) -> bool:
        stop = self._stop_requested or (self.stop_after is not None and step >= self.stop_after)
        stop = stop or (self._deadline is not None and time.monotonic() >= self._deadline)
        if accelerator.num_processes > 1:  # every process must stop at the same step
            flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
            stop = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop and step < self.cfg.max_steps

    def _diverged(self, accelerator: Any, watch: DivergenceWatch, loss: float, root: Path) -> TrainingError:
        """The error of a diverged run. The checkpoints from the step before its first bad loss on
        (their weights gave that loss, or were never seen to give a good one) are set aside, so a
        resume continues from the newest one whose weights still trained well."""
        first = watch.first_bad_step or 0
        moved = ckpt.set_aside(root, first - 1) if accelerator.is_main_process else []
        accelerator.wait_for_everyone()
        healthy = ckpt.latest(root)
        aside = f"; set aside: {', '.join(p.name for p in moved)}" if moved else ""
        resume = f"--resume continues from {healthy.name}" if healthy else "no healthy checkpoint is left"
        return TrainingError(
            f"{watch.message(loss)}{aside}",
            hint=f"{resume}; give it another seed (the same seed replays the same steps)",
        )

    def _save(
        self,
        accelerator: Any,
        root: Path,
        step: int,
        position: DataPosition,
        modules: dict[str, nn.Module],
        optimizer: Any,
        scheduler: Any,
        ema: EMA | None,
        disc: nn.Module | None,
        disc_opt: Any,
        teacher_text: nn.Module | None,
    ) -> None:
        main = accelerator.is_main_process
        tmp = root / f".tmp-{ckpt.step_dir_name(step)}"
        error: OSError | None = None
        if main:
            try:
                tmp = ckpt.begin(root, step)
            except OSError as exc:
                error = exc
        accelerator.wait_for_everyone()
        state: dict[str, Any] = {"step": step, "epoch": position.epoch, "batch": position.batch}
        try:
            rng_tensors, rng_meta = ckpt.capture_rng()
            if error is None:
                ckpt.write_group(tmp, f"rng-{accelerator.process_index}", rng_tensors)
                (tmp / f"rng-{accelerator.process_index}.json").write_text(_json(rng_meta))
            if main and error is None:
                for name, module in modules.items():
                    ckpt.write_group(tmp, f"module-{name}", _trainable_state(module))
                if ema is not None:
                    ckpt.write_group(tmp, "ema", ema.state_tensors())
                    state["ema_updates"] = ema.updates
                tensors, meta = ckpt.optimizer_to_tensors(
                    optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
                )
                ckpt.write_group(tmp, "optimizer", tensors)
                state["optimizer"] = meta
                state["scheduler"] = {
                    "last_epoch": scheduler.last_epoch,
                    "_step_count": scheduler._step_count,
                }
                if disc is not None and disc_opt is not None:
                    ckpt.write_group(tmp, "module-disc", disc.state_dict())
                    inner = disc_opt.optimizer if hasattr(disc_opt, "optimizer") else disc_opt
                    d_tensors, d_meta = ckpt.optimizer_to_tensors(inner)
                    ckpt.write_group(tmp, "disc_optimizer", d_tensors)
                    state["disc_optimizer"] = d_meta
                if teacher_text is not None:
                    ckpt.write_group(tmp, "teacher_text", teacher_text.conditioner.projection.state_dict())
        except OSError as exc:
            error = exc
        accelerator.wait_for_everyone()
        if main:
            if error is not None:
                raise ckpt.abort(tmp, step, error, root)
            try:
                ckpt.commit(root, tmp, step, state, self.cfg.keep_checkpoints)
            except OSError as exc:
                raise ckpt.abort(tmp, step, exc, root) from None
        accelerator.wait_for_everyone()

    def _load(
        self,
        path: Path,
        modules: dict[str, nn.Module],
        optimizer: Any,
        scheduler: Any,
        ema: EMA | None,
        disc: nn.Module | None,
        disc_opt: Any,
        teacher_text: nn.Module | None,
        rank: int,
    ) -> tuple[int, DataPosition]:
        state = ckpt.read_state(path)
        for name, module in modules.items():
            module.load_state_dict(ckpt.read_group(path, f"module-{name}"), strict=False)
        if ema is not None:
            ema.load_state_tensors(ckpt.read_group(path, "ema"), state["ema_updates"])
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        ckpt.optimizer_from_tensors(inner, ckpt.read_group(path, "optimizer"), state["optimizer"])
        scheduler.last_epoch = state["scheduler"]["last_epoch"]
        scheduler._step_count = state["scheduler"]["_step_count"]
        scheduler._last_lr = [group["lr"] for group in inner.param_groups]
        if disc is not None and disc_opt is not None:
            disc.load_state_dict(ckpt.read_group(path, "module-disc"))
            d_inner = disc_opt.optimizer if hasattr(disc_opt, "optimizer") else disc_opt
            ckpt.optimizer_from_tensors(
                d_inner, ckpt.read_group(path, "disc_optimizer"), state["disc_optimizer"]
            )
        if teacher_text is not None:
            teacher_text.conditioner.projection.load_state_dict(ckpt.read_group(path, "teacher_text"))
        rng_file = path / f"rng-{rank}.json"
        if rng_file.exists():
            import json

            ckpt.restore_rng(ckpt.read_group(path, f"rng-{rank}"), json.loads(rng_file.read_text()))
        return int(state["step"]), DataPosition(epoch=int(state["epoch"]), batch=int(state["batch"]))

    def _samples(
        self,
        accelerator: Any,
        wrapped: dict[str, nn.Module],
        parts: StudentParts,
        run_dir: Path,
        step: int,
        events: EventWriter,
    ) -> None:
        cfg = self.cfg
        steps = cfg.step_distill.student_steps if cfg.stage == "step-distill" else cfg.sample.steps
        unet = accelerator.unwrap_model(wrapped["unet"])
        text = accelerator.unwrap_model(wrapped["text"])
        paths = write_samples(cfg, unet, text, parts, run_dir / "samples", step, steps, accelerator.device)
        events.emit("preview", step=step, total=cfg.max_steps, data={"samples": [str(p) for p in paths]})

    def _finish(
        self,
        accelerator: Any,
        wrapped: dict[str, nn.Module],
        parts: StudentParts,
        ema: EMA | None,
        run_dir: Path,
    ) -> Path:
        unet = accelerator.unwrap_model(wrapped["unet"])
        if ema is not None:
            ema.copy_to(unet)
        if self.cfg.stage == "finetune" and self.cfg.lora.rank > 0:
            unet = merge_lora(unet)
        text = accelerator.unwrap_model(wrapped["text"])
        return save_final(run_dir / "final", unet, text, parts, self.cfg)

    def _export(self, run_dir: Path) -> str | None:
        """Hand the final checkpoint to the bundle export when that module exists (training_tools.export)."""
        if not self.cfg.export:
            return None
        try:
            module = importlib.import_module("training_tools.export")
        except ModuleNotFoundError:
            return None
        if not hasattr(module, "export_bundle"):
            return None
        return str(module.export_bundle(run_dir))


def trajectory_targets(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_sim: torch.Tensor,
    x_data: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    sub: int,
    *,
    with_data: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step distillation's targets from the teacher's ``velocity(x, t)`` (any batch size): its
    ``sub``-step Euler path from ``x_sim`` at ``t`` to ``t_next`` as one velocity and, ``with_data``,
    its velocity at the data-noised ``x_data`` (else None). Both inputs sit at ``t``, so the path's
    first velocity and the data target come from one call on the two batches together: ``sub`` calls
    instead of ``sub + 1`` (on this CPU a call on twice the batch costs less than two calls)."""
    first = target = None
    if with_data:
        first, target = velocity(torch.cat([x_sim, x_data]), torch.cat([t, t])).chunk(2)
    x_next = flow.euler_segment(velocity, x_sim, t, t_next, sub, first=first)
    return (x_next - x_sim) / (t_next - t).view(-1, 1, 1, 1), target


def simulate_chains(
    model: Any, x: torch.Tensor, times: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, pooled: Any
) -> torch.Tensor:
    """Each sample's own ``k[i]`` Euler steps of ``model`` (velocity ``model(x, 1000 t, tokens,
    pooled)``) from ``times[0]`` along ``times``. At step j only the samples with ``k > j`` run: with k
    uniform over the student's steps that is half the forward passes of running the whole batch to
    ``max(k)`` and masking the rest."""
    for j in range(int(k.max())):
        moving = (k > j).nonzero().squeeze(1)
        v = model(
            x[moving],
            times[j].expand(moving.numel()) * 1000,
            tokens[moving],
            None if pooled is None else pooled[moving],
        ).float()
        x = x.index_add(0, moving, (times[j + 1] - times[j]) * v)
    return x


def _release_accelerate_state(accelerator: Any) -> None:
    """Forget Accelerate's process-wide singleton state after a single-process run, so another run
    in the same Python process (tests, a notebook) may pick other settings."""
    if accelerator.num_processes > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _twice(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else torch.cat([value, value])


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers by name (frozen base weights of a LoRA model are left out)."""
    state = {name: p for name, p in module.named_parameters() if p.requires_grad}
    state.update(dict(module.named_buffers()))
    return state


def _estimate_message(est: Estimate) -> str:
    d = est.as_dict()
    return (
        f"estimate: {d['params_m']} M params ({d['trainable_m']} M trainable), about {d['memory_gib']} GiB per process "
        f"(activations {d['activations_gib']} GiB), {d['seconds_per_step']} s/step, {d['total_hours']} h in total"
    )


class _Context:
    """The stage-specific loss computation (kept apart from the loop's bookkeeping)."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Any,
        wrapped: dict[str, nn.Module],
        parts: StudentParts,
        teacher: Teacher | None,
        teacher_text: nn.Module | None,
        projector: nn.Module | None,
        disc: nn.Module | None,
        disc_wrapped: nn.Module | None,
        probe: dict[str, Any],
    ) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.unet = wrapped["unet"]
        self.text = wrapped["text"]
        self.projector = wrapped.get("projector")
        self.parts = parts
        self.teacher = teacher
        self.teacher_text = teacher_text
        self.disc = disc
        self.disc_wrapped = disc_wrapped
        self._pending: dict[str, torch.Tensor] = {}  # the generator pass's inputs of the disc step
        self._fake_feats: list[Feature] = []  # and the teacher's features of its fake samples
        self.use_pooled = parts.unet_config.pooled_dim > 0

    def _shift(self, latents: torch.Tensor) -> float:
        return sampling_shift(self.cfg, latents.shape[-2], latents.shape[-1])

    def _condition(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> tuple[Any, Any, Any, Any]:
        frozen = {k[5:]: v for k, v in batch.items() if k.startswith("text.")}
        b = batch["latents"].shape[0]
        drop = self.parts.text.sample_drop_mask(b, gen).to(batch["latents"].device)
        tokens, pooled = self.text(frozen, drop)
        t_tokens = t_pooled = None
        if self.teacher_text is not None:
            with torch.no_grad():
                t_tokens, t_pooled = self.teacher_text(frozen, drop)
        return tokens, pooled if self.use_pooled else None, t_tokens, t_pooled

    def loss(
        self, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of one micro-batch and its terms (floats, for the events)."""
        cfg = self.cfg
        x0 = batch["latents"]
        dev = x0.device
        b = x0.shape[0]
        shift = self._shift(x0)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        tokens, pooled, t_tokens, t_pooled = self._condition(batch, gen)
        if cfg.stage == "step-distill":
            null = self._teacher_null(batch) if cfg.step_distill.teacher_guidance > 1.0 else None
            return self._step_distill_loss(x0, eps, tokens, pooled, t_tokens, t_pooled, gen, shift, null)
        t = flow.sample_t(b, mean=cfg.flow.logit_mean, std=cfg.flow.logit_std, shift=shift, generator=gen).to(
            dev
        )
        x_t = flow.add_noise(x0, eps, t)
        need_feats = self.projector is not None
        out = self.unet(x_t, t * 1000, tokens, pooled, return_features=need_feats)
        v_s, feats = out if need_feats else (out, {})
        l_task = losses.per_sample_mse(v_s, flow.velocity_target(x0, eps))
        terms = {"task": float(l_task.mean().detach())}
        if self.teacher is None:
            return l_task.mean(), terms
        with torch.no_grad(), self.acc.autocast():
            v_t, t_feats = self.teacher(x_t, t, t_tokens, t_pooled)
        kd: dict[str, tuple[torch.Tensor, float]] = {}
        l_out = losses.per_sample_mse(v_s, v_t)
        weight = cfg.kd.output_weight if cfg.stage == "distill" else cfg.lora.distill_weight
        kd["out"] = (l_out, weight)
        terms["kd_out"] = float(l_out.mean().detach())
        if self.projector is not None and "kd_tokens" in feats:
            s_tok = feats["kd_tokens"]
            s_grid = losses.token_grid(s_tok.shape[1], x0.shape[-2], x0.shape[-1])
            target, t_grid = t_feats[-1]
            l_feat = losses.feature_kd_loss(self.projector(s_tok, s_grid, t_grid), target)
            kd["feat"] = (l_feat, cfg.kd.feature_weight)
            terms["kd_feat"] = float(l_feat.mean().detach())
        a_t = losses.task_weight(t, cfg.flow.logit_mean, cfg.flow.logit_std).to(dev)
        # Fine-tuning's KD term is a regulariser towards the base, which is where the student
        # starts: the timestep-aware ratio |L_task| / |L_kd| is unbounded there and pinned LoRA runs
        # to the base (150 steps changed nothing, at any lora.distill_weight, as it scales both
        # terms). A plain weighted sum lets the task move the model and the base pull it back.
        scaling = "sum" if cfg.stage == "finetune" else cfg.kd.scaling
        total = losses.combine(l_task, kd, a_t, scaling)
        terms["total"] = float(total.detach())
        return total, terms

    def _teacher_null(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's unconditional text input (every encoder dropped), shaped like the batch's."""
        assert self.teacher_text is not None
        frozen = {k[5:]: v for k, v in batch.items() if k.startswith("text.")}
        drop = torch.ones((batch["latents"].shape[0], self.parts.text.num_encoders), dtype=torch.bool)
        with torch.no_grad():
            return self.teacher_text(frozen, drop)

    def _step_distill_loss(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        tokens: torch.Tensor,
        pooled: torch.Tensor | None,
        t_tokens: Any,
        t_pooled: Any,
        gen: torch.Generator,
        shift: float,
        null: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Trajectory distillation (+ the adversarial term). With ``null`` (the teacher's unconditional
        text) the targets are the teacher's classifier-free-guided velocities at
        ``step_distill.teacher_guidance``, on the trajectory and at the data-noised point alike, so the
        few-step student samples with one network call per step and no CFG, as the paper's 4-step model.
        """
        cfg, sd = self.cfg, self.cfg.step_distill
        assert self.teacher is not None
        teacher = self.teacher
        dev, b = x0.device, x0.shape[0]
        times = flow.schedule(sd.student_steps, shift).to(dev)
        k = torch.randint(0, sd.student_steps, (b,), generator=gen).to(dev)
        t, t_next = times[k], times[k + 1]
        x_data = flow.add_noise(x0, eps, t)
        # Backward simulation: x at t_k as the student's own k-step chain from fresh noise reaches it,
        # so the distillation target sits on the trajectories the few-step sampler really visits.
        x_sim = torch.randn(x0.shape, generator=gen).to(dev)
        with torch.no_grad(), self.acc.autocast():
            x_sim = simulate_chains(self.acc.unwrap_model(self.unet), x_sim, times, k, tokens, pooled)

        def teacher_velocity(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            copies = x.shape[0] // b  # 1, or 2 for the trajectory and the data-noised point at once
            tok = t_tokens.repeat(copies, 1, 1)
            pool = None if t_pooled is None else t_pooled.repeat(copies, 1)
            if null is None:
                return teacher(x, tt, tok, pool)[0].float()
            null_pooled = None if pool is None else torch.cat([pool, null[1].repeat(copies, 1)])
            both = teacher(
                torch.cat([x, x]),
                torch.cat([tt, tt]),
                torch.cat([tok, null[0].repeat(copies, 1, 1)]),
                null_pooled,
            )
            cond, uncond = both[0].float().chunk(2)
            return uncond + sd.teacher_guidance * (cond - uncond)

        # Targets: the teacher's multi-step Euler path over the student's interval, as a velocity, and
        # with guidance the guided field at the data-noised point too (not the unguided data velocity).
        sub = max(1, sd.teacher_steps // sd.student_steps)
        with torch.no_grad(), self.acc.autocast():
            v_target, data_target = trajectory_targets(
                teacher_velocity, x_sim, x_data, t, t_next, sub, with_data=null is not None
            )
        if data_target is None:
            data_target = flow.velocity_target(x0, eps)
        # One student call on both inputs: the data-noised one (task loss) and the simulated one.
        both = self.unet(torch.cat([x_data, x_sim]), torch.cat([t, t]) * 1000, _twice(tokens), _twice(pooled))
        v_data, v_s = both.float().chunk(2)
        l_task = losses.per_sample_mse(v_data, data_target)
        l_traj = losses.per_sample_mse(v_s, v_target)
        a_t = losses.task_weight(t, cfg.flow.logit_mean, cfg.flow.logit_std).to(dev)
        total = losses.combine(l_task, {"traj": (l_traj, 1.0)}, a_t, cfg.kd.scaling)
        x_t = x_sim
        terms = {"task": float(l_task.mean().detach()), "kd_traj": float(l_traj.mean().detach())}
        if self.disc is not None:
            x0_hat = flow.x0_from_velocity(x_t, v_s, t)
            adv_mean = cfg.flow.logit_mean if sd.adv_logit_mean is None else sd.adv_logit_mean
            s = flow.sample_t(b, mean=adv_mean, std=cfg.flow.logit_std, shift=shift, generator=gen).to(dev)
            eps2 = torch.randn(x0.shape, generator=gen).to(dev)
            with self.acc.autocast():
                fake_feats = teacher(flow.add_noise(x0_hat, eps2, s), s, t_tokens, t_pooled)[1]
            # Heads evaluated with detached weights: the generator loss must not train the discriminator.
            frozen_heads = {n: p.detach() for n, p in self.disc.named_parameters()}
            logits = torch.func.functional_call(self.disc, frozen_heads, (fake_feats,))
            l_gen = losses.generator_loss(logits, sd.gan_loss)
            total = total + sd.adv_weight * l_gen
            terms["gen"] = float(l_gen.detach())
            # The discriminator's step needs these same fake features (of the detached x0_hat through
            # the frozen teacher): kept, not computed again.
            self._pending = {"x0": x0, "eps2": eps2, "s": s, "tokens": t_tokens}
            self._fake_feats = [(f.detach().float(), g) for f, g in fake_feats]
            if t_pooled is not None:
                self._pending["pooled"] = t_pooled
        terms["total"] = float(total.detach())
        return total, terms

    def disc_loss(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """Discriminator loss on re-noised real latents vs the student's last x0 estimates (their
        teacher features kept from the generator's pass)."""
        assert self.teacher is not None and self.disc_wrapped is not None
        p = self._pending
        with torch.no_grad(), self.acc.autocast():
            real_feats = self.teacher(
                flow.add_noise(p["x0"], p["eps2"], p["s"]), p["s"], p["tokens"], p.get("pooled")
            )[1]
        feats = [
            (torch.cat([real.float(), fake]), grid)
            for (real, grid), (fake, _) in zip(real_feats, self._fake_feats, strict=True)
        ]
        logits = self.disc_wrapped(feats)
        real, fake = logits.chunk(2)
        return losses.discriminator_loss(real, fake, self.cfg.step_distill.gan_loss)
