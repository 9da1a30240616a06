"""The emoji classifier of EmojiEval: a small convnet trained on augmented crops of real renders.

Training crops come from composed scenes (all kinds, so object sizes and neighbours look like the
eval's) drawn from random streams with their own salts, so the classifier never sees the
generator's training images. Augmentations (blur, down-up sampling, noise, colour jitter, box jitter,
shifts) stand in for a generator's imperfections. The penultimate features (global average pool,
``widths[-1]`` dims) feed the Frechet distance.

``python -m training_tools.emoji_world.classifier train --out DIR [--minutes 5] [--num-classes 200]``
writes DIR/model.safetensors, config.json, classes.json and metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from snapgen_app.config import ConfigBase, require
from snapgen_app.errors import ConfigError, SnapGenError
from training_tools.precision import cpu_has_fast_bf16

from .compose import make_scene, sample_request
from .curation import EmojiClass, curate, load_classes, save_classes
from .render import Box, square_crop

TRAIN_SALT, HELDOUT_SALT = 2, 3  # the generator's dataset uses salt 1
CROP_MARGIN = 0.12
CLASSIFIER_MIX = {"single": 0.3, "count": 0.2, "two": 0.15, "position": 0.25, "row": 0.1}
WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE, METRICS_FILE = (
    "model.safetensors",
    "config.json",
    "classes.json",
    "metrics.json",
)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(ConfigBase):
    """Architecture of the classifier: input crops [B, 3, input_size, input_size] in [0, 1]."""

    num_classes: int
    input_size: int = 32
    widths: tuple[int, ...] = (24, 48, 96, 192)
    dropout: float = 0.1

    def validate(self) -> None:
        require(self.num_classes >= 2, "num_classes", "must be >= 2")
        require(
            self.input_size % (2 ** (len(self.widths) - 1)) == 0, "input_size", "must divide by 2^(stages-1)"
        )

    @property
    def feature_dim(self) -> int:
        """Size of the penultimate features used by the Frechet distance."""
        return self.widths[-1]


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class EmojiClassifier(nn.Module):
    """Conv stages (one conv each, two in the last two) with 2x max-pooling, global average pool,
    dropout, linear head."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for i, width in enumerate(config.widths):
            layers.append(_conv_bn(c_in, width))
            if i >= len(config.widths) - 2:
                layers.append(_conv_bn(width, width))
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = width
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(c_in, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, S, S] float in [0, 1] -> penultimate features [B, widths[-1]] float."""
        return self.body(x * 2.0 - 1.0).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, S, S] float in [0, 1] -> logits [B, num_classes]."""
        return self.head(self.dropout(self.features(x)))


# --- data ------------------------------------------------------------------------------------


def _augment_scene(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur or down-up sampling, as a generator's soft outputs look; applied to the whole scene."""
    roll = rng.random()
    if roll < 0.3:
        return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.3))))
    if roll < 0.55:
        small = int(rng.integers(40, 96))
        return image.resize((small, small), Image.Resampling.BILINEAR).resize(
            image.size, Image.Resampling.BILINEAR
        )
    return image


def _jitter_box(box: Box, rng: np.random.Generator, amount: float) -> Box:
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0)
    d = rng.uniform(-amount, amount, size=4) * size
    return (round(x0 + d[0]), round(y0 + d[1]), round(x1 + d[2]), round(y1 + d[3]))


def make_crops(
    classes: Sequence[EmojiClass],
    num_crops: int,
    seed: int,
    salt: int,
    *,
    input_size: int = 32,
    augment: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops of objects in composed scenes: (crops [N, S, S, 3] uint8, labels [N] int64).

    Scene j uses rng([seed, j, salt]); ``augment`` adds blur/resampling, noise and box jitter.
    """
    crops = np.zeros((num_crops, input_size, input_size, 3), dtype=np.uint8)
    labels = np.zeros(num_crops, dtype=np.int64)
    kinds = sorted(CLASSIFIER_MIX)
    probs = np.asarray([CLASSIFIER_MIX[k] for k in kinds])
    filled, scene = 0, 0
    while filled < num_crops:
        rng = np.random.default_rng([seed, scene, salt])
        scene += 1
        request = sample_request(kinds[int(rng.choice(len(kinds), p=probs))], classes, rng)
        image, spec = make_scene(request, classes, rng, postprocess=_augment_scene if augment else None)
        if augment and rng.random() < 0.4:
            noisy = image.astype(np.float32) + rng.normal(0.0, rng.uniform(2.0, 10.0), size=image.shape)
            image = np.clip(noisy, 0, 255).astype(np.uint8)
        for obj in spec.objects:
            if filled == num_crops:
                break
            box = _jitter_box(obj.bbox, rng, 0.08) if augment else obj.bbox
            crops[filled] = square_crop(image, box, input_size, CROP_MARGIN)
            labels[filled] = obj.class_index
            filled += 1
    return crops, labels


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """[N, S, S, 3] uint8 -> [N, 3, S, S] float32 in [0, 1]."""
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)


def _batch_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample shift (up to 3 px), brightness/contrast jitter and Gaussian noise on [B, 3, S, S]."""
    b, _, s, _ = x.shape
    pad = 3
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(s))[:, None, :, None].expand(b, 3, s, s + 2 * pad)
    x = padded.gather(2, rows)  # [B, 3, S, S + 2 pad]
    cols = (ox[:, None] + torch.arange(s))[:, None, None, :].expand(b, 3, s, s)
    x = x.gather(3, cols)
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    brightness = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.12
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    x = x + torch.randn(x.shape, generator=generator) * 0.03 * torch.rand(b, 1, 1, 1, generator=generator)
    return x.clamp_(0.0, 1.0)


# --- training --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How to train: crops per class, seeds, budget (minutes, or epochs when given), threads."""

    crops_per_class: int = 80
    heldout_per_class: int = 10
    seed: int = 0
    minutes: float = 5.0
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 3e-3
    threads: int = 1  # on a shared 2-core CPU, 2 threads ran ~10x slower than 1 (contention)
    bf16: bool = True  # bf16 autocast where this CPU computes in bf16 (training_tools.precision)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def accuracy(model: EmojiClassifier, crops: np.ndarray, labels: np.ndarray, bf16: bool = False) -> float:
    """Top-1 accuracy of ``model`` on crops [N, S, S, 3] uint8 with labels [N]."""
    predicted = predict(model, crops, bf16=bf16)[0]
    return float(np.mean(predicted == labels))


@torch.no_grad()
def predict(
    model: EmojiClassifier, crops: np.ndarray, *, batch_size: int = 256, bf16: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classify crops [N, S, S, 3] uint8: (labels [N] int64, probabilities [N, C] float32,
    penultimate features [N, F] float32). Runs in eval mode."""
    model.eval()
    labels, probs, feats = [], [], []
    for start in range(0, len(crops), batch_size):
        x = to_tensor(crops[start : start + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            f = model.features(x)
            logits = model.head(f)
        p = logits.float().softmax(-1)
        labels.append(p.argmax(-1).numpy())
        probs.append(p.numpy())
        feats.append(f.float().numpy())
    if not labels:
        n, c = 0, model.config.num_classes
        return (
            np.zeros(0, np.int64),
            np.zeros((n, c), np.float32),
            np.zeros((n, model.config.feature_dim), np.float32),
        )
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(feats)


def train_classifier(
    classes: Sequence[EmojiClass], settings: TrainSettings, config: ClassifierConfig | None = None
) -> tuple[EmojiClassifier, dict[str, Any]]:
    """Train on fresh crops (salt TRAIN_SALT), measure on held-out crops (salt HELDOUT_SALT).

    Returns (model in eval mode, metrics {heldout_accuracy, heldout_accuracy_augmented, train_seconds, ...}).
    With ``settings.epochs`` the run is step-deterministic; otherwise it stops at ``settings.minutes``
    with a cosine learning rate over the elapsed fraction of the budget.
    """
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    config = config or ClassifierConfig(num_classes=len(classes))
    started = time.perf_counter()
    n_train = settings.crops_per_class * len(classes)
    crops, labels = make_crops(classes, n_train, settings.seed, TRAIN_SALT, input_size=config.input_size)
    heldout = make_crops(
        classes,
        settings.heldout_per_class * len(classes),
        settings.seed,
        HELDOUT_SALT,
        input_size=config.input_size,
        augment=False,
    )
    heldout_aug = make_crops(
        classes,
        settings.heldout_per_class * len(classes),
        settings.seed + 1,
        HELDOUT_SALT,
        input_size=config.input_size,
        augment=True,
    )
    data_seconds = time.perf_counter() - started
    _log(f"classifier: {n_train} training crops, {len(heldout[1])} held-out, built in {data_seconds:.1f} s")
    model = EmojiClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(settings.seed)
    x_all, y_all = to_tensor(crops), torch.from_numpy(labels)
    steps_per_epoch = max(1, n_train // settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch if settings.epochs else None
    budget = settings.minutes * 60.0
    warmup_steps = min(50, max(1, total_steps // 5)) if total_steps else 50
    use_bf16 = settings.bf16 and cpu_has_fast_bf16()
    train_start, step, samples = time.perf_counter(), 0, 0
    while True:
        elapsed = time.perf_counter() - train_start
        progress = step / total_steps if total_steps else elapsed / budget
        if progress >= 1.0:
            break
        warm = min(1.0, (step + 1) / warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        if step % steps_per_epoch == 0:
            order = torch.randperm(n_train, generator=generator)
        idx = order[
            (step % steps_per_epoch) * settings.batch_size : (step % steps_per_epoch + 1)
            * settings.batch_size
        ]
        model.train()
        x = _batch_augment(x_all[idx], generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(model(x).float(), y_all[idx], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        samples += len(idx)
        if step % 200 == 0:
            _log(
                f"classifier: step {step} loss {loss.item():.3f} {samples / (time.perf_counter() - train_start):.0f} samples/s"
            )
    train_seconds = time.perf_counter() - train_start
    model.eval()
    metrics = {
        "heldout_accuracy": accuracy(model, *heldout),
        "heldout_accuracy_augmented": accuracy(model, *heldout_aug),
        "train_accuracy_sample": accuracy(model, crops[:2000], labels[:2000]),
        "num_classes": len(classes),
        "train_crops": n_train,
        "heldout_crops": len(heldout[1]),
        "steps": step,
        "epochs": round(samples / n_train, 2),
        "samples_per_second": round(samples / max(train_seconds, 1e-9), 1),
        "train_seconds": round(train_seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "bf16": use_bf16,
        "threads": settings.threads,
    }
    return model, metrics


# --- files -----------------------------------------------------------------------------------


def save_classifier(
    directory: str | Path, model: EmojiClassifier, classes: Sequence[EmojiClass], metrics: dict[str, Any]
) -> None:
    """Write model.safetensors (float32), config.json, classes.json and metrics.json as the folder
    ``directory``: into a temporary sibling first, renamed into place when complete (a stop or a
    full disk mid-save leaves no folder that looks finished). A folder that holds anything else is
    refused, never replaced."""
    out = Path(directory).resolve()
    ours = {WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE, METRICS_FILE}
    if out.exists() and (not out.is_dir() or any(p.name not in ours for p in out.iterdir())):
        raise ConfigError(
            str(out), "holds other files than a classifier's", hint="choose an empty or new folder for --out"
        )
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save(tmp / CONFIG_FILE)
    save_classes(list(classes), tmp / CLASSES_FILE)
    (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def load_classifier(directory: str | Path) -> tuple[EmojiClassifier, list[EmojiClass]]:
    """Load a classifier saved by :func:`save_classifier`: (model in eval mode, its class list)."""
    path = Path(directory)
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE) if not (path / n).is_file()]
    if missing:
        raise ConfigError(
            str(path),
            f"not a classifier directory (missing {', '.join(missing)})",
            hint="train one: python -m training_tools.emoji_world.classifier train --out DIR",
        )
    config = ClassifierConfig.load(path / CONFIG_FILE)
    classes = load_classes(path / CLASSES_FILE)
    if len(classes) != config.num_classes:
        raise ConfigError(
            str(path / CLASSES_FILE), f"{len(classes)} classes but config says {config.num_classes}"
        )
    model = EmojiClassifier(config)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.eval(), classes


# --- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training_tools.emoji_world.classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on real renders and save to --out")
    t.add_argument("--out", required=True)
    t.add_argument("--classes", help="classes.json (default: curate --num-classes with --class-seed)")
    t.add_argument("--num-classes", type=int, default=200)
    t.add_argument("--class-seed", type=int, default=0)
    t.add_argument("--crops-per-class", type=int, default=80)
    t.add_argument("--heldout-per-class", type=int, default=10)
    t.add_argument("--minutes", type=float, default=5.0, help="time budget (ignored with --epochs)")
    t.add_argument("--epochs", type=int, help="fixed number of epochs instead of a time budget")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core CPU)")
    t.add_argument("--no-bf16", action="store_true", help="train in float32 (about 2x slower on CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        classes = load_classes(args.classes) if args.classes else curate(args.num_classes, args.class_seed)
        settings = TrainSettings(
            crops_per_class=args.crops_per_class,
            heldout_per_class=args.heldout_per_class,
            seed=args.seed,
            minutes=args.minutes,
            epochs=args.epochs,
            threads=args.threads,
            bf16=not args.no_bf16,
        )
        model, metrics = train_classifier(classes, settings)
        save_classifier(args.out, model, classes, metrics)
    except SnapGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
