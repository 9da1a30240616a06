"""Per-sample learning efficiency of denoiser architectures on the emoji world, side by side.

One plain flow-matching loop (the same for every architecture: logit-normal t, timestep shift,
AdamW, bf16 autocast, EMA, 10 % prompt dropout to the embedding of "") over a recipe run's latent
and text cache, then EmojiEval at 28 steps with CFG. Text conditioning is the frozen MiniLM
last_hidden_state (384-d, 24 tokens) fed to cross-attention as is, so the architectures differ
only in the UNet. A diagnostic script, not product code: the recipe trains with
``training_tools.trainer``.

    python benchmarks/denoiser_pilot.py --arch snapgen-student --run runs/emoji-v2 --steps 1000 \
        --out runs/pilot/arch-snapgen
    python benchmarks/denoiser_pilot.py --arch diffusers-feasibility ...

On a GPU machine that cannot read the run folder (the lent H100/H200: no network, a 64 MiB carry),
``--make-pack DIR`` writes what the loop needs into one small folder (single-object images only, int8
latents and int8 MiniLM states, the eval prompts' states, decoder, classifier), and ``--pack DIR
--device cuda --eval-at 83200,166400 --minutes 7`` trains from it and scores the EMA model at each
sample count (``results.jsonl``)::

    python benchmarks/denoiser_pilot.py --make-pack .gpu/pack --run runs/emoji-v2 --per-class 45 \
        --per-category 80
    python benchmarks/denoiser_pilot.py --arch snapgen-student --pack .gpu/pack --device cuda \
        --per-category 80 --precision fp32 --batch 128 --lr 1e-3 --eval-at 83200,166400,332800 \
        --minutes 7 --out $OUT/student

On a GPU, ``--precision fp32`` (TF32 matmuls) ran this loop 1.45x faster than bf16 autocast on an
H100, and ``--speed-only`` times ``--steps`` steps (after 10 warm-up steps) without an eval.

Diagnostic switches (session 7): ``--condition class`` replaces the MiniLM states by two learned
tokens (the object's class, the caption's background colour), which isolates the text pathway;
``--decay-from STEP`` lets the learning rate fall on a half cosine to 0 at ``--steps``;
``--ema-decay`` sets the EMA (default 0.995).

Architectures: ``snapgen-teacher`` (preset tiny-emoji-teacher without the pooled input),
``snapgen-student`` (preset tiny-emoji-student without the pooled input),
``snapgen-student-sa8`` (the student with self-attention at 8x8 latents too),
``snapgen-student-narrow`` (preset tiny-emoji-small: the student at widths 64/96/128),
``snapgen-dense`` (the same with dense 3x3 convs), ``diffusers-feasibility`` (the emoji-world
feasibility run's diffusers UNet2DConditionModel: (64, 128, 192), one layer per block,
cross-attention at 8x8 and 4x4).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from training_tools import flow


class SnapGenWrap(nn.Module):
    def __init__(
        self, dense: bool, preset: str = "tiny-emoji-student", channels: int = 16, **changes: object
    ) -> None:
        super().__init__()
        from snapgen_app.model.presets import unet_preset
        from snapgen_app.model.unet import SnapGenUNet

        cfg = unet_preset(preset).replace(
            pooled_dim=0, in_channels=channels, out_channels=channels, **changes
        )
        if dense:
            cfg = cfg.replace(separable_conv=False, conv_expansion=1.0)
        self.net = SnapGenUNet.from_unet_config(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(x, t * 1000.0, encoder_hidden_states=tokens)


class DiffusersWrap(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.net = UNet2DConditionModel(
            sample_size=16,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(64, 128, 192),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=384,
            attention_head_dim=32,
            norm_num_groups=32,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(x, t * 1000.0, encoder_hidden_states=tokens).sample


class ClassCondWrap(nn.Module):
    """``--condition class``: the denoiser sees two learned tokens (the object's class, the caption's
    background colour or none) instead of MiniLM states; index ``n`` of each table is the null token.
    A diagnostic of the text pathway: same UNet, same cross-attention width."""

    def __init__(self, inner: nn.Module, classes: int, backgrounds: int, width: int = 384) -> None:
        super().__init__()
        self.inner = inner
        self.cls = nn.Embedding(classes + 1, width)
        self.bg = nn.Embedding(backgrounds + 1, width)
        nn.init.normal_(self.cls.weight, std=0.5)
        nn.init.normal_(self.bg.weight, std=0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t, torch.stack([self.cls(ids[:, 0]), self.bg(ids[:, 1])], 1))


_BACKGROUND = re.compile(r" on an? (\w+) background$")


def class_ids(text: str, cls: int, colours: list[str]) -> list[int]:
    """[class, background] of a caption; the background index is len(colours) when it names none."""
    m = _BACKGROUND.search(text)
    return [cls, colours.index(m.group(1)) if m and m.group(1) in colours else len(colours)]


def build(arch: str, channels: int = 16) -> nn.Module:
    """The denoiser ``arch`` for ``channels``-channel latents (the cache's autoencoder decides)."""
    if arch == "snapgen-student":
        return SnapGenWrap(dense=False, channels=channels)
    if arch == "snapgen-teacher":
        return SnapGenWrap(dense=False, preset="tiny-emoji-teacher", channels=channels)
    if arch == "snapgen-student-sa8":  # self-attention at 8x8 too (stage 2), not only 4x4
        return SnapGenWrap(dense=False, channels=channels, self_attention=(False, True, True))
    if arch == "snapgen-student-narrow":  # preset tiny-emoji-small without the pooled input
        return SnapGenWrap(dense=False, preset="tiny-emoji-small", channels=channels)
    if arch == "snapgen-dense":
        return SnapGenWrap(dense=True, channels=channels)
    if arch == "diffusers-feasibility":
        return DiffusersWrap(channels)
    raise SystemExit(f"unknown arch {arch}")


def load_cache(
    cache: Path, per_class: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents [N, C, h, w], caption index [N], text tokens [captions, L, 384] and whether each image
    is a single-object one [N] (the folder's metadata.jsonl); with ``per_class`` only the first that
    many single-object images of each class."""
    index = json.loads((cache / "index.json").read_text())
    folder = Path(index["entries"][0]["file"]).parent
    meta = {}
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        meta[row["file_name"]] = row
    counts: dict[int, int] = {}
    shards: dict[int, dict[str, torch.Tensor]] = {}
    latents, captions, single = [], [], []
    for n, entry in enumerate(index["entries"]):
        row = meta[Path(entry["file"]).name]
        if per_class:
            cls = row["objects"][0]["class_index"]
            if row["kind"] != "single" or counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
        captions.append(entry["caption"])
        single.append(row["kind"] == "single")
        if entry["shard"] not in shards:
            shards[entry["shard"]] = load_file(str(cache / f"latents-{entry['shard']:05d}.safetensors"))
        latents.append(shards[entry["shard"]][str(n)])
    text = load_file(str(cache / "text-00000.safetensors"))["tokens.0"]
    return torch.stack(latents), torch.tensor(captions), text, torch.tensor(single)


def draw_batch(single: torch.Tensor, batch: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of one batch: uniform over the images, or each a single-object image with
    probability ``fraction`` (>= 0) and a composition otherwise."""
    if fraction < 0:
        return torch.randint(0, len(single), (batch,), generator=gen)
    singles, others = single.nonzero().flatten(), (~single).nonzero().flatten()
    pick_single = torch.rand(batch, generator=gen) < fraction
    a = singles[torch.randint(0, len(singles), (batch,), generator=gen)]
    if len(others) == 0:
        return a
    b = others[torch.randint(0, len(others), (batch,), generator=gen)]
    return torch.where(pick_single, a, b)


def _quantize(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per slice over ``dims`` (kept as size-1 dims)."""
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-8) / 127.0
    return (x / scale).round().clamp(-127, 127).to(torch.int8), scale.float()


def make_pack(run: Path, cache: Path, per_class: int, per_category: int, out: Path) -> None:
    """The single-object images of a run's cache (``per_class`` per class), their caption states,
    the eval prompts' states, the decoder and the classifier, in one folder that fits a device carry."""
    from safetensors.torch import save_file

    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from snapgen_app.model.text_encoders import TextConditioner
    from training_tools.emoji_world.classifier import load_classifier
    from training_tools.emoji_world.eval import make_prompts

    latents, caption_ids, text, single = load_cache(cache, per_class)
    keep = single.nonzero().flatten()
    latents, caption_ids = latents[keep], caption_ids[keep]
    used, caption_ids = torch.unique(caption_ids, return_inverse=True)
    latents_q, latents_scale = _quantize(latents.float(), (0, 1, 2, 3))
    tokens_q, tokens_scale = _quantize(text[used].float(), (2,))
    conditioner = TextConditioner.from_pretrained(run / "text-init").eval()
    _, classes = load_classifier(run / "classifier")
    prompts = sorted({spec.text for spec in make_prompts(classes, per_category)})
    with torch.no_grad():
        eval_tokens = conditioner.encode_frozen([*prompts, ""])[0][0].float()
    eval_q, eval_scale = _quantize(eval_tokens, (2,))
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "latents_q": latents_q.contiguous(),
            "latents_scale": latents_scale.reshape(1),
            "caption_ids": caption_ids.contiguous(),
            "tokens_q": tokens_q.contiguous(),
            "tokens_scale": tokens_scale.half().contiguous(),
            "eval_tokens_q": eval_q.contiguous(),
            "eval_tokens_scale": eval_scale.half().contiguous(),
        },
        str(out / "data.safetensors"),
    )
    (out / "eval_prompts.json").write_text(json.dumps([*prompts, ""]))
    ae = SnapGenAutoencoder.from_pretrained(str(run / "autoencoder" / "final"), use_safetensors=True)
    ae.half().save_pretrained(str(out / "autoencoder"))
    shutil.copytree(run / "classifier", out / "classifier", dirs_exist_ok=True)
    print(f"pack: {len(latents)} images, {len(used)} captions, {len(prompts)} eval prompts -> {out}")


class Data:
    """What the loop trains on and evaluates with: latents, caption index, caption states, whether
    each image is a single-object one, and a text -> states lookup for generation."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.pack:
            if args.condition == "class":
                raise SystemExit("--condition class needs --run/--cache (a pack holds no class labels)")
            pack = Path(args.pack)
            d = load_file(str(pack / "data.safetensors"))
            self.latents = d["latents_q"].float() * d["latents_scale"]
            self.caption_ids = d["caption_ids"]
            self.text = d["tokens_q"].float() * d["tokens_scale"].float()
            self.single = torch.ones(len(self.latents), dtype=torch.bool)
            prompts = json.loads((pack / "eval_prompts.json").read_text())
            states = d["eval_tokens_q"].float() * d["eval_tokens_scale"].float()
            self.eval_tokens = dict(zip(prompts, states, strict=True))
            self.null = self.eval_tokens[""]
            self.autoencoder, self.classifier = pack / "autoencoder", pack / "classifier"
            self.conditioner = None
        else:
            run = Path(args.run)
            self.latents, self.caption_ids, self.text, self.single = load_cache(
                Path(args.cache) if args.cache else run / "cache", args.per_class
            )
            self.eval_tokens = {}
            self.autoencoder, self.classifier = run / "autoencoder" / "final", run / "classifier"
            from snapgen_app.model.text_encoders import TextConditioner

            self.conditioner = TextConditioner.from_pretrained(run / "text-init").eval()
            self.null = self.tokens([""])[0]
            if args.condition == "class":
                self._use_class_tokens(run, Path(args.cache) if args.cache else run / "cache", args)

    def _use_class_tokens(self, run: Path, cache: Path, args: argparse.Namespace) -> None:
        """Replace caption states by [class, background] ids (``--condition class``)."""
        from training_tools.emoji_world.classifier import load_classifier
        from training_tools.emoji_world.eval import make_prompts

        index = json.loads((cache / "index.json").read_text())
        folder = Path(index["entries"][0]["file"]).parent
        cls_of_caption: dict[int, int] = {}
        class_of_file = {}
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            row = json.loads(line)
            class_of_file[row["file_name"]] = row["objects"][0]["class_index"]
        for entry in index["entries"]:
            cls_of_caption[entry["caption"]] = class_of_file[Path(entry["file"]).name]
        _, classes = load_classifier(run / "classifier")
        colours = sorted({c for k in classes for c in k.backgrounds})
        self.num_classes, self.num_backgrounds = len(classes), len(colours)
        captions = index["captions"]
        table = [class_ids(captions[i], cls_of_caption.get(i, 0), colours) for i in range(len(captions))]
        self.text = torch.tensor(table)
        self.null = torch.tensor([len(classes), len(colours)])
        self.conditioner = None
        self.eval_tokens = {
            spec.text: torch.tensor(class_ids(spec.text, spec.classes[0], colours))
            for spec in make_prompts(classes, args.per_category)
        }

    def tokens(self, texts: list[str]) -> torch.Tensor:
        if self.conditioner is None:
            return torch.stack([self.eval_tokens[t] for t in texts])
        with torch.no_grad():
            return self.conditioner.encode_frozen(texts)[0][0].float()


def load_autoencoder(data: Data, device: torch.device) -> nn.Module:
    from snapgen_app.model.autoencoder import SnapGenAutoencoder

    ae = SnapGenAutoencoder.from_pretrained(str(data.autoencoder), use_safetensors=True)
    return ae.float().eval().to(device)


def evaluate(model: nn.Module, ae: nn.Module, data: Data, args: argparse.Namespace, out: Path) -> dict:
    """EmojiEval of ``model`` at 28 steps, CFG 4 (the recipe's eval settings)."""
    from training_tools.recipes.emoji_eval import run_eval
    from training_tools.samples import seeded_noise

    device = torch.device(args.device)
    null = data.null.to(device)

    @torch.no_grad()
    def generate(texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        tok = data.tokens(texts).to(device)
        unc = null.expand_as(tok)
        x = seeded_noise(seeds, tuple(data.latents.shape[1:])).to(device)
        times = flow.schedule(28, args.shift).to(device)
        for i in range(28):
            tt = times[i].expand(x.shape[0])
            with autocast(device, args):
                v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([tok, unc])).float()
            vc, vu = v.chunk(2)
            x = x + (times[i + 1] - times[i]) * (vu + 4.0 * (vc - vu))
        images = ae.decode(x).float().cpu()
        return list(((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())

    # A pack carries no emoji font: no Frechet distance (it renders real images) from one.
    return run_eval(generate, data.classifier, args.per_category, out / "images", with_frechet=not args.pack)


def autocast(device: torch.device, args: argparse.Namespace) -> torch.autocast:
    """bf16 autocast, or (``--precision fp32``) none: plain fp32, TF32 matmuls on a GPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def lr_at(step: int, args: argparse.Namespace) -> float:
    """100 warm-up steps, constant, then (with ``--decay-from``) a half cosine to 0 at ``--steps``."""
    lr = args.lr * min(1.0, (step + 1) / 100)
    if args.decay_from and step >= args.decay_from:
        frac = (step - args.decay_from) / max(1, args.steps - args.decay_from)
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return lr


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="snapgen-student")
    p.add_argument("--run", default="runs/emoji-v2", help="recipe run: autoencoder, text-init, classifier")
    p.add_argument("--cache", default="", help="latent/text cache (default: RUN/cache)")
    p.add_argument("--pack", default="", help="train from a folder written by --make-pack")
    p.add_argument("--make-pack", default="", help="write a pack folder for a device machine and stop")
    p.add_argument("--per-class", type=int, default=0, help="only N single-object images per class")
    p.add_argument(
        "--single-fraction",
        type=float,
        default=-1.0,
        help="share of single-object images per batch (-1: as stored)",
    )
    p.add_argument(
        "--steps", type=int, default=0, help="optimizer steps (default: 1000, or no limit with --minutes)"
    )
    p.add_argument("--minutes", type=float, default=0.0, help="stop training after this wall time")
    p.add_argument("--eval-at", default="", help="also score the EMA model at these sample counts")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--decay-from",
        type=int,
        default=0,
        help="from this optimizer step on, the learning rate falls on a half cosine to 0 at --steps",
    )
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument(
        "--condition",
        choices=("text", "class"),
        default="text",
        help="text: frozen MiniLM states; class: two learned tokens (class, background), a diagnostic",
    )
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision", choices=("bf16", "fp32"), default="bf16", help="fp32: no autocast (TF32 on a GPU)"
    )
    p.add_argument(
        "--channels-last", action="store_true", help="model and inputs in channels-last memory format"
    )
    p.add_argument("--save", action="store_true", help="also write the EMA weights to OUT/ema.safetensors")
    p.add_argument("--speed-only", action="store_true", help="train --steps, print samples/s, no eval")
    p.add_argument("--per-category", type=int, default=40)
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.steps = args.steps or (10**9 if args.minutes else 1000)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.make_pack:
        run = Path(args.run)
        cache = Path(args.cache) if args.cache else run / "cache"
        make_pack(run, cache, args.per_class, args.per_category, Path(args.make_pack))
        return
    if not args.out:
        raise SystemExit("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    data = Data(args)
    print(f"{len(data.latents)} training images", flush=True)
    latents, text, null = data.latents.to(device), data.text.to(device), data.null.to(device)
    caption_ids, single = data.caption_ids.to(device), data.single
    model = build(args.arch, latents.shape[1])
    if args.condition == "class":
        model = ClassCondWrap(model, data.num_classes, data.num_backgrounds)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ae = load_autoencoder(data, device)  # loaded once for every eval point
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, foreach=True)
    gen = torch.Generator().manual_seed(0)
    eval_at = sorted(int(n) for n in args.eval_at.split(",") if n)
    base = {
        "arch": args.arch,
        "params": params,
        "images": len(latents),
        "batch": args.batch,
        "lr": args.lr,
        "shift": args.shift,
        "decay_from": args.decay_from,
        "ema_decay": args.ema_decay,
        "condition": args.condition,
        "device": args.device,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "threads": args.threads,
    }
    if device.type == "cuda":
        base["device_name"] = torch.cuda.get_device_name(device)
    results: list[dict] = []

    def score(samples: int, train_s: float) -> None:
        started = time.monotonic()
        report = evaluate(ema, ae, data, args, out / f"eval-{samples}")
        row = {
            **base,
            "samples": samples,
            "train_s": round(train_s, 1),
            "samples_per_s": round(samples / max(train_s, 1e-9), 1),
            "eval_s": round(time.monotonic() - started, 1),
            "per_category": report["per_category"],
            "overall": report["overall"],
            "frechet": report["frechet_distance"],
        }
        results.append(row)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    train_s, step = 0.0, 0
    mark = time.monotonic()
    while step < args.steps and not (args.minutes and train_s >= args.minutes * 60):
        idx = draw_batch(single, args.batch, args.single_fraction, gen).to(device)
        x0 = latents[idx]
        tokens = text[caption_ids[idx]].clone()
        drop = (torch.rand(args.batch, generator=gen) < 0.1).to(device)
        drop = drop.view(-1, *[1] * (tokens.dim() - 1))
        tokens = torch.where(drop, null, tokens)  # no host sync (boolean indexing has one)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        t = flow.sample_t(args.batch, mean=0.0, std=1.0, shift=args.shift, generator=gen).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with autocast(device, args):
            v = model(flow.add_noise(x0, eps, t), t, tokens)
        loss = torch.nn.functional.mse_loss(v.float(), flow.velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - args.ema_decay)
        step += 1
        samples = step * args.batch
        if args.speed_only and step == 10:  # time from step 10 on: warm-up and cuDNN autotuning left out
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s, mark = 0.0, time.monotonic()
        if step % 100 == 0 or (eval_at and samples >= eval_at[0]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.monotonic()
            train_s, mark = train_s + now - mark, now
            if step % 500 == 0:
                print(f"step {step} loss {loss.item():.4f} {train_s:.0f}s", flush=True)
            if eval_at and samples >= eval_at[0]:
                eval_at.pop(0)
                score(samples, train_s)
                mark = time.monotonic()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s += time.monotonic() - mark
    if args.speed_only:
        timed = step - 10 if step > 10 else step
        row = {
            **base,
            "steps": timed,
            "train_s": round(train_s, 2),
            "samples_per_s": round(timed * args.batch / train_s, 1),
        }
        print(json.dumps(row), flush=True)
        (out / "speed.json").write_text(json.dumps(row))
        return
    if not results or results[-1]["samples"] != step * args.batch:
        score(step * args.batch, train_s)
    (out / "result.json").write_text(json.dumps(results[-1], indent=1))
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / "ema.safetensors"))


if __name__ == "__main__":
    main()
