"""Training the small autoencoder (our encoder + the tiny decoder) on an image folder.

``python -m training_tools.autoencoder_trainer --data DIR --out RUN_DIR [--preset emoji]
[--minutes 20] [--resume]``

Loss: L1 on pixels + ``edge_weight`` x L1 on horizontal/vertical image gradients (a cheap,
LPIPS-free sharpness term: the decoder is the sharpness ceiling of the whole model) + a tiny L2 on
the raw latent (keeps its scale bounded without a KL term). bf16 autocast on CPU, AdamW with a
linear warm-up and a cosine decay over the *time* budget (the notes measured divergence at lr 1e-3
without zero-initialised residuals; the decoder's residual branches start at zero and lr stays
at 4e-4). Most of the budget trains on random crops (the nets are fully convolutional, crops are
~4x cheaper per step); the last ``full_fraction`` trains on whole images so GroupNorm sees the
statistics it sees at generation time.

The run directory holds ``checkpoints/step-NNNNNNNN/`` (model, EMA-free, optimizer, RNG, elapsed
seconds) and, when done, ``final/`` (a diffusers-layout :class:`SnapGenAutoencoder` whose
``scaling_factor``/``shift_factor`` are measured on the data: diffusion latents have unit variance)
plus ``final/metrics.json`` (held-out PSNR). A finished run is not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from snapgen_app.config import ConfigBase, require
from snapgen_app.errors import SnapGenError, TrainingError
from snapgen_app.images import rgb_image
from snapgen_app.model.autoencoder import SnapGenAutoencoder, autoencoder_preset
from training_tools import checkpoint as ckpt
from training_tools.data import scan_folder
from training_tools.events import EventWriter
from training_tools.precision import cpu_has_fast_bf16, cpu_words

STAGE = "autoencoder"


@dataclasses.dataclass(frozen=True)
class AutoencoderTrainConfig(ConfigBase):
    """Settings of one autoencoder run (saved as ``run_dir/ae_config.json``)."""

    data: str = ""
    preset: str = "emoji"
    minutes: float = 20.0
    max_steps: int = 0  # > 0: stop after this many steps (the schedule follows steps, not time)
    max_images: int = 12000  # images kept in memory for training (uint8)
    heldout: int = 256  # images after the training ones, for the PSNR
    resolution: int = 128
    crop: int = 64
    batch_size: int = 32
    full_batch_size: int = 16
    full_fraction: float = 0.2
    lr: float = 4e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    edge_weight: float = 0.5
    latent_weight: float = 1e-4
    # > 0: the decoder also reconstructs 2x-downsampled images from 2x-downsampled latents (scale
    # equivariance, Skorokhodov et al. 2025), which removes latent high frequencies the image lacks.
    scale_equivariance_weight: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    bf16: bool = True  # bf16 autocast where this CPU computes in bf16 (training_tools.precision), else fp32
    checkpoint_minutes: float = 3.0

    def validate(self) -> None:
        require(bool(self.data), "data", "is required (a dataset folder)")
        require(self.minutes > 0, "minutes", "must be positive")
        require(
            self.crop % 8 == 0 and self.crop <= self.resolution,
            "crop",
            "must be a multiple of 8 <= resolution",
        )
        require(0.0 <= self.full_fraction <= 1.0, "full_fraction", "must be in [0, 1]")
        require(self.max_images >= 1 and self.heldout >= 1, "max_images", "must be >= 1")
        require(self.lr > 0, "lr", "must be positive")
        require(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = time budget only)")
        require(self.scale_equivariance_weight >= 0, "scale_equivariance_weight", "must be >= 0")


def load_images(paths: list[str], resolution: int) -> torch.Tensor:
    """Image files -> uint8 tensor [N, 3, R, R] (resized to R when needed)."""
    out = torch.empty((len(paths), 3, resolution, resolution), dtype=torch.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = rgb_image(img)
            if img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
    return out


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical finite differences of two [B, 3, H, W] images."""
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def reconstruction_loss(
    model: SnapGenAutoencoder, images: torch.Tensor, cfg: AutoencoderTrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch [B, 3, H, W] float32 in [-1, 1]: (total, its terms as floats)."""
    mean, _ = model.encode_moments(images)
    recon = model.decoder(mean).float()
    l1 = (recon - images).abs().mean()
    edge = gradient_l1(recon, images)
    latent = mean.float().pow(2).mean()
    total = l1 + cfg.edge_weight * edge + cfg.latent_weight * latent
    terms = {"l1": float(l1.detach()), "edge": float(edge.detach()), "latent_sq": float(latent.detach())}
    if cfg.scale_equivariance_weight > 0:
        small = model.decoder(F.avg_pool2d(mean, 2)).float()
        equivariance = (small - F.avg_pool2d(images, 2)).abs().mean()
        total = total + cfg.scale_equivariance_weight * equivariance
        terms["scale_equivariance"] = float(equivariance.detach())
    return total, terms


def random_crops(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image of uint8 [B, 3, H, W]."""
    b, _, h, w = images.shape
    ys = torch.randint(0, h - size + 1, (b,), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (b,), generator=gen).tolist()
    return torch.stack(
        [images[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(ys, xs, strict=True))]
    )


def lr_factor(step: int, fraction_done: float, cfg: AutoencoderTrainConfig) -> float:
    """Linear warm-up over steps, then cosine over the elapsed fraction of the time budget (to 5 %)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction_done)))


@torch.no_grad()
def psnr(model: SnapGenAutoencoder, images: torch.Tensor, batch: int = 32) -> float:
    """Mean PSNR (dB, images in [0, 1]) of clamped reconstructions of uint8 [N, 3, H, W]."""
    model.eval()
    values = []
    for start in range(0, len(images), batch):
        x = to_float(images[start : start + batch])
        mean, _ = model.encode_moments(x)
        recon = model.decoder(mean).clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values.append(-10 * torch.log10(mse))
    model.train()
    return float(torch.cat(values).mean())


@torch.no_grad()
def latent_statistics(
    model: SnapGenAutoencoder, images: torch.Tensor, batch: int = 64
) -> tuple[float, float]:
    """(mean, std) of the raw latent over uint8 images [N, 3, H, W] (all channels pooled, SD3-style)."""
    model.eval()
    latents = [model.encode_moments(to_float(images[s : s + batch]))[0] for s in range(0, len(images), batch)]
    flat = torch.cat(latents).flatten()
    return float(flat.mean()), float(flat.std())


def _save_final(
    model: SnapGenAutoencoder, images: torch.Tensor, heldout: torch.Tensor, out: Path, info: dict[str, Any]
) -> Path:
    mean, std = latent_statistics(model, images[:1024])
    base = model.autoencoder_config
    raw = base.to_dict()
    final_model = SnapGenAutoencoder(
        latent_channels=raw["latent_channels"],
        scaling_factor=1.0 / max(std, 1e-6),
        shift_factor=mean,
        encoder_config=raw["encoder"],
        decoder_config=raw["decoder"],
    )
    final_model.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    final_model.save_pretrained(tmp, safe_serialization=True)
    metrics = {
        **info,
        "heldout_psnr_db": round(psnr(final_model, heldout), 3),
        "latent_mean": mean,
        "latent_std": std,
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def train_autoencoder(cfg: AutoencoderTrainConfig, run_dir: str | Path, *, resume: bool = True) -> Path:
    """Train (or continue) an autoencoder run; returns ``run_dir/final``. Finished runs return at once."""
    run = Path(run_dir)
    final = run / "final"
    if (final / "metrics.json").is_file():
        return final
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "ae_config.json"
    if saved.is_file():
        old = AutoencoderTrainConfig.from_dict(json.loads(saved.read_text()))
        differs = {k for k, v in old.to_dict().items() if cfg.to_dict()[k] != v} - {
            "minutes",
            "checkpoint_minutes",
            "threads",
        }
        if differs:
            raise TrainingError(
                f"{saved} was written with other settings ({sorted(differs)})",
                hint="use the same settings to resume, or another --out",
            )
    saved.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    events = EventWriter(STAGE, run / "events.jsonl")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    items = scan_folder(cfg.data).items
    n_train = min(cfg.max_images, max(1, len(items) - cfg.heldout))
    if len(items) < 2:
        raise TrainingError(f"{cfg.data} holds {len(items)} images; the autoencoder needs at least 2")
    train_paths = [it.path for it in items[:n_train]]
    held_paths = [it.path for it in items[n_train : n_train + cfg.heldout]] or train_paths[-1:]
    t0 = time.perf_counter()
    images = load_images(train_paths, cfg.resolution)
    heldout = load_images(held_paths, cfg.resolution)
    events.emit(
        "log",
        message=f"loaded {len(images)} training + {len(heldout)} held-out images in {time.perf_counter() - t0:.1f} s",
    )

    model = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset(cfg.preset))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    root = run / "checkpoints"
    latest = ckpt.latest(root) if resume else None
    if latest is not None:
        state = ckpt.read_state(latest)
        model.load_state_dict(ckpt.read_group(latest, "model"))
        ckpt.optimizer_from_tensors(opt, ckpt.read_group(latest, "optimizer"), state["optimizer"])
        ckpt.restore_rng(ckpt.read_group(latest, "rng"), state["rng"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        events.emit("log", step=step, message=f"resumed from {latest.name} ({elapsed / 60:.1f} min done)")

    budget = cfg.minutes * 60.0
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    last_ckpt, window_t, window_n = time.perf_counter(), time.perf_counter(), 0
    started = time.perf_counter() - elapsed
    events.emit(
        "started",
        step=step,
        message=f"autoencoder {cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, {cfg.minutes} min",
    )
    use_bf16 = cfg.bf16 and cpu_has_fast_bf16()
    events.emit(
        "log",
        step=step,
        message="precision: "
        + ("bf16 autocast" if use_bf16 else "fp32" if not cfg.bf16 else cpu_words("no")),
        data={"bf16": use_bf16},
    )
    while elapsed < budget and not (cfg.max_steps and step >= cfg.max_steps):
        fraction = step / cfg.max_steps if cfg.max_steps else elapsed / budget
        full = fraction >= 1.0 - cfg.full_fraction
        bsz = cfg.full_batch_size if full else cfg.batch_size
        idx = torch.randint(0, len(images), (bsz,), generator=gen)
        batch = images[idx] if full else random_crops(images[idx], cfg.crop, gen)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, fraction, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss, terms = reconstruction_loss(model, to_float(batch), cfg)
        if not math.isfinite(float(loss)):
            raise TrainingError(f"autoencoder loss became {float(loss)} at step {step}", hint="lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        window_n += bsz
        elapsed = time.perf_counter() - started
        now = time.perf_counter()
        if step % 50 == 0:
            events.emit(
                "progress",
                step=step,
                message=f"{'full' if full else 'crops'}",
                eta_s=max(0.0, budget - elapsed),
                data={
                    "loss": terms,
                    "lr": opt.param_groups[0]["lr"],
                    "samples_per_s": window_n / max(now - window_t, 1e-9),
                },
            )
            window_t, window_n = now, 0
        done = elapsed >= budget or (cfg.max_steps and step >= cfg.max_steps)
        if now - last_ckpt >= cfg.checkpoint_minutes * 60 or done:
            _checkpoint(root, step, elapsed, model, opt)
            last_ckpt = now
    info = {
        "steps": step,
        "train_minutes": round(elapsed / 60, 2),
        "train_images": len(images),
        "heldout_images": len(heldout),
    }
    out = _save_final(model, images, heldout, final, info)
    events.emit(
        "finished", step=step, message=f"saved {out}", data=json.loads((out / "metrics.json").read_text())
    )
    return out


def _checkpoint(
    root: Path, step: int, elapsed: float, model: SnapGenAutoencoder, opt: torch.optim.Optimizer
) -> None:
    tmp = ckpt.begin(root, step)
    ckpt.write_group(tmp, "model", model.state_dict())
    tensors, meta = ckpt.optimizer_to_tensors(opt)
    ckpt.write_group(tmp, "optimizer", tensors)
    rng_tensors, rng_meta = ckpt.capture_rng()
    ckpt.write_group(tmp, "rng", rng_tensors)
    ckpt.commit(
        root, tmp, step, {"step": step, "elapsed_s": elapsed, "optimizer": meta, "rng": rng_meta}, keep=2
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training_tools.autoencoder_trainer", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--data", required=True, help="dataset folder (images + metadata.jsonl or .txt captions)")
    p.add_argument("--out", required=True, help="run directory (resumed when it holds checkpoints)")
    p.add_argument("--preset", default="emoji")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--max-images", type=int, default=12000)
    p.add_argument("--heldout", type=int, default=256)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scale-equivariance",
        type=float,
        default=0.0,
        help="weight of the scale-equivariance term (decode 2x-downsampled latents to 2x-downsampled images)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad settings)."""
    args = _parser().parse_args(argv)
    try:
        cfg = AutoencoderTrainConfig(
            data=args.data,
            preset=args.preset,
            minutes=args.minutes,
            max_images=args.max_images,
            heldout=args.heldout,
            resolution=args.resolution,
            batch_size=args.batch_size,
            lr=args.lr,
            threads=args.threads,
            seed=args.seed,
            scale_equivariance_weight=args.scale_equivariance,
        )
        out = train_autoencoder(cfg, args.out)
    except SnapGenError as exc:
        print(f"autoencoder_trainer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"final": str(out), **json.loads((out / "metrics.json").read_text())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
