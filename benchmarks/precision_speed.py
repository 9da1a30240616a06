"""bf16 autocast against fp32 on this CPU, side by side: a linear layer and a training step of the
emoji recipe's teacher UNet, and which precision ``mixed_precision: auto`` picks here.

    .venv/bin/python benchmarks/precision_speed.py [--batch 64] [--rounds 3] [--threads 2] [--json OUT]

Each round times fp32 then bf16 (alternating, so the machine's drift hits both); the table gives the
medians and bf16's speed-up (> 1: bf16 faster). The training step is forward + backward + AdamW of
``tiny-emoji-student`` (8.9 M, the recipe's teacher) on 16 x 16 x 16 latents (128 px images) with
77 text tokens of width 384, as in the recipe's teacher stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from snapgen_app.model.presets import unet_preset
from snapgen_app.model.unet import SnapGenUNet
from training_tools.precision import cpu_has_fast_bf16, resolve_precision


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (kernel selection, allocator)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def linear_case() -> tuple[Callable[[bool], Callable[[], object]], float]:
    x, w = torch.randn(16384, 256), torch.randn(1024, 256)

    def make(bf16: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return F.linear(x, w)

        return run

    return make, 2.0 * 16384 * 256 * 1024


def training_case(batch: int) -> Callable[[bool], Callable[[], object]]:
    torch.manual_seed(0)
    cfg = unet_preset("tiny-emoji-student").replace(in_channels=16, out_channels=16)
    unet = SnapGenUNet.from_unet_config(cfg).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch, 16, 16, 16)
    t = torch.rand(batch) * 1000
    tokens = torch.randn(batch, 77, cfg.context_dim)
    pooled = torch.randn(batch, cfg.pooled_dim)
    target = torch.randn_like(x)

    def make(bf16: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = unet(x, t, tokens, pooled)
            loss = F.mse_loss(out.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return run

    return make


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    chosen, reason = resolve_precision("auto", "cpu")
    make_linear, flops = linear_case()
    make_step = training_case(args.batch)
    times: dict[str, dict[str, list[float]]] = {
        "linear": {"fp32": [], "bf16": []},
        "step": {"fp32": [], "bf16": []},
    }
    for n in range(1, args.rounds + 1):
        for name, make, repeat in (("linear", make_linear, 5), ("step", make_step, 2)):
            for label in ("fp32", "bf16"):
                times[name][label].append(timed(make(label == "bf16"), repeat))
        print(
            f"round {n}: linear fp32 {times['linear']['fp32'][-1] * 1e3:.1f} ms, bf16 {times['linear']['bf16'][-1] * 1e3:.1f} ms; "
            f"step fp32 {times['step']['fp32'][-1]:.2f} s, bf16 {times['step']['bf16'][-1]:.2f} s",
            flush=True,
        )
    med = {name: {label: statistics.median(v) for label, v in rows.items()} for name, rows in times.items()}
    report = {
        "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "auto_picks": chosen,
        "reason": reason,
        "threads": args.threads,
        "rounds": args.rounds,
        "linear_gflops": {label: flops / s / 1e9 for label, s in med["linear"].items()},
        "linear_bf16_speedup": med["linear"]["fp32"] / med["linear"]["bf16"],
        "step_batch": args.batch,
        "step_samples_per_s": {label: args.batch / s for label, s in med["step"].items()},
        "step_bf16_speedup": med["step"]["fp32"] / med["step"]["bf16"],
    }
    print(f"\nmedians of {args.rounds} rounds, {args.threads} threads; auto picks {chosen!r}: {reason}")
    print("| case | fp32 | bf16 autocast | bf16 speed-up |")
    print("|---|---|---|---|")
    lg = report["linear_gflops"]
    print(
        f"| linear [16384x256]x[256x1024] | {lg['fp32']:.1f} GFLOP/s | {lg['bf16']:.1f} GFLOP/s | {report['linear_bf16_speedup']:.2f}x |"
    )
    sp = report["step_samples_per_s"]
    print(
        f"| teacher training step, batch {args.batch} | {sp['fp32']:.1f} samples/s | {sp['bf16']:.1f} samples/s "
        f"| {report['step_bf16_speedup']:.2f}x |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
