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

Architectures: ``snapgen-student`` (preset tiny-emoji-student without the pooled input),
``snapgen-dense`` (the same with dense 3x3 convs), ``diffusers-feasibility`` (the emoji-world
feasibility run's diffusers UNet2DConditionModel: (64, 128, 192), one layer per block,
cross-attention at 8x8 and 4x4).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from training_tools import flow


class SnapGenWrap(nn.Module):
    def __init__(self, dense: bool) -> None:
        super().__init__()
        from snapgen_app.model.presets import unet_preset
        from snapgen_app.model.unet import SnapGenUNet

        cfg = unet_preset("tiny-emoji-student").replace(pooled_dim=0)
        if dense:
            cfg = cfg.replace(separable_conv=False, conv_expansion=1.0)
        self.net = SnapGenUNet.from_unet_config(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(x, t * 1000.0, encoder_hidden_states=tokens)


class DiffusersWrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.net = UNet2DConditionModel(
            sample_size=16,
            in_channels=16,
            out_channels=16,
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


def build(arch: str) -> nn.Module:
    if arch == "snapgen-student":
        return SnapGenWrap(dense=False)
    if arch == "snapgen-dense":
        return SnapGenWrap(dense=True)
    if arch == "diffusers-feasibility":
        return DiffusersWrap()
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


def null_tokens(run: Path) -> torch.Tensor:
    from snapgen_app.model.text_encoders import TextConditioner

    conditioner = TextConditioner.from_pretrained(run / "text-init").eval()
    with torch.no_grad():
        return conditioner.encode_frozen([""])[0][0][0].float()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", required=True)
    p.add_argument("--run", default="runs/emoji-v2", help="recipe run: autoencoder, text-init, classifier")
    p.add_argument("--cache", default="", help="latent/text cache (default: RUN/cache)")
    p.add_argument("--per-class", type=int, default=0, help="only N single-object images per class")
    p.add_argument(
        "--single-fraction",
        type=float,
        default=-1.0,
        help="share of single-object images per batch (-1: as stored)",
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-category", type=int, default=40)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    latents, caption_ids, text, single = load_cache(
        Path(args.cache) if args.cache else run / "cache", args.per_class
    )
    print(f"{len(latents)} training images", flush=True)
    null = null_tokens(run)
    model = build(args.arch)
    params = sum(p.numel() for p in model.parameters())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    started = time.monotonic()
    for step in range(args.steps):
        idx = draw_batch(single, args.batch, args.single_fraction, gen)
        x0 = latents[idx]
        tokens = text[caption_ids[idx]].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        tokens[drop] = null
        eps = torch.randn(x0.shape, generator=gen)
        t = flow.sample_t(args.batch, mean=0.0, std=1.0, shift=args.shift, generator=gen)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model(flow.add_noise(x0, eps, t), t, tokens)
        loss = torch.nn.functional.mse_loss(v.float(), flow.velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - 0.995)
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.monotonic() - started:.0f}s", flush=True)
    train_s = time.monotonic() - started

    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from training_tools.recipes.emoji_eval import run_eval
    from training_tools.samples import seeded_noise

    ae = SnapGenAutoencoder.from_pretrained(str(run / "autoencoder" / "final"), use_safetensors=True).eval()
    from snapgen_app.model.text_encoders import TextConditioner

    conditioner = TextConditioner.from_pretrained(run / "text-init").eval()

    @torch.no_grad()
    def generate(texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        tok = conditioner.encode_frozen(texts)[0][0].float()
        unc = null.expand_as(tok)
        x = seeded_noise(seeds, (16, 16, 16))
        times = flow.schedule(28, args.shift)
        for i in range(28):
            tt = times[i].expand(x.shape[0])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                v = ema(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([tok, unc])).float()
            vc, vu = v.chunk(2)
            x = x + (times[i + 1] - times[i]) * (vu + 4.0 * (vc - vu))
        images = ae.decode(x)
        return list(((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())

    report = run_eval(generate, run / "classifier", args.per_category, out / "images")
    result = {
        "arch": args.arch,
        "params": params,
        "images": len(latents),
        "single_fraction": args.single_fraction,
        "steps": args.steps,
        "batch": args.batch,
        "threads": args.threads,
        "train_s": round(train_s, 1),
        "samples_per_s": round(args.steps * args.batch / train_s, 1),
        "per_category": report["per_category"],
        "overall": report["overall"],
        "frechet": report["frechet_distance"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
