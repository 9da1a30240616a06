"""Tiny-decoder design variants side by side, in one run: speed and reconstruction quality.

    .venv/bin/python benchmarks/decoder_variants.py speed [--px 1024] [--runs 3] [--sd3]
    .venv/bin/python benchmarks/decoder_variants.py quality --data runs/emoji-v2/dataset [--steps 600]
        [--variant NAME ...] [--threads 2]

``speed``: each variant of :data:`VARIANTS` (the paper-sized ``snapgen-tiny`` decoder with its options
changed) exported with the bench's torchscript path and timed in ONNX Runtime fp32 (2 threads, median
of ``--runs`` after a warm-up), with parameters and counted GFLOP; ``--sd3`` adds the SD3 decoder
in the same run for the ratio issue 3 asks for (>= 30x).

``quality``: the same variants as the decoder of an autoencoder with the ``emoji`` encoder, each
trained by :func:`training_tools.autoencoder_trainer.train_autoencoder` for the same number of
steps on the same emoji renders, then held-out PSNR. Equal steps, not equal time: the faster
variant would otherwise also get more training.
Prints one JSON object per variant; ``--json OUT`` writes them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> DecoderConfig fields changed from the snapgen-tiny preset's decoder
VARIANTS: dict[str, dict[str, Any]] = {
    "groupnorm-all (current)": {},
    "norm-free 512/1024 px stages": {"norm_stages": 2},
    "norm-free 512/1024 + 1 block there": {"norm_stages": 2, "stage_layers": (2, 2, 1, 1)},
}


def decoder_config(changes: dict[str, Any]) -> Any:
    from snapgen_app.model.autoencoder import autoencoder_preset

    return dataclasses.replace(autoencoder_preset("snapgen-tiny").decoder, **changes)


def speed(px: int, runs: int, with_sd3: bool) -> list[dict[str, Any]]:
    import onnxruntime as ort
    import torch

    from snapgen_app.model import bench
    from snapgen_app.model.autoencoder import TinyDecoder, count_parameters
    from snapgen_app.model.export import export_decoder

    torch.set_num_threads(bench.THREADS)
    latent = torch.randn(1, 16, px // 8, px // 8, generator=torch.Generator().manual_seed(0))
    modules: dict[str, tuple[torch.nn.Module, float]] = {}
    for name, changes in VARIANTS.items():
        torch.manual_seed(0)
        module = TinyDecoder(decoder_config(changes)).eval()
        bench._randomize_zero_params(module, 0)
        modules[name] = (module, count_parameters(module) / 1e6)
    if with_sd3:
        sd3, _ = bench._decoder_module("sd3")
        modules["sd3"] = (sd3, sum(p.numel() for p in sd3.vae.decoder.parameters()) / 1e6)
    rows = []
    with tempfile.TemporaryDirectory(prefix="snapgen-decoders-") as tmp:
        for index, (name, (module, params_m)) in enumerate(modules.items()):
            gflop = bench.count_gflops(lambda m=module: m(latent))
            path = Path(tmp) / f"decoder{index}.onnx"
            export_decoder(module, path, latent_channels=16, example_latent=(8, 8), exporter="torchscript")
            options = ort.SessionOptions()
            options.intra_op_num_threads = bench.THREADS
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feeds = {"latent": latent.numpy()}
            times = bench.time_runs(lambda s=session, f=feeds: s.run(None, f), runs=runs, warmup=1)
            median = statistics.median(times)
            rows.append(
                {
                    "variant": name,
                    "px": px,
                    "params_m": round(params_m, 3),
                    "gflop": round(gflop, 1),
                    "median_s": round(median, 3),
                    "runs": runs,
                    "gflops_per_s": round(gflop / median, 1),
                    "times": [round(t, 3) for t in times],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del session
    if with_sd3:
        sd3_s = next(r["median_s"] for r in rows if r["variant"] == "sd3")
        for row in rows:
            row["sd3_over_this"] = round(sd3_s / row["median_s"], 2)
    return rows


def quality(data: str, steps: int, max_images: int, names: list[str], threads: int) -> list[dict[str, Any]]:
    from snapgen_app.model import autoencoder as ae
    from training_tools.autoencoder_trainer import AutoencoderTrainConfig, train_autoencoder

    rows = []
    base = ae.autoencoder_preset("emoji")
    for index, (name, changes) in enumerate(VARIANTS.items()):
        if name not in names:
            continue
        preset = f"decoder-variant-{index}"
        ae.AUTOENCODER_PRESETS[preset] = dataclasses.replace(base, decoder=decoder_config(changes))
        with tempfile.TemporaryDirectory(prefix="snapgen-decoder-quality-") as tmp:
            cfg = AutoencoderTrainConfig(
                data=data,
                preset=preset,
                minutes=600.0,
                max_images=max_images,
                max_steps=steps,
                threads=threads,
            )
            started = time.perf_counter()
            final = train_autoencoder(cfg, tmp, resume=False)
            metrics = json.loads((final / "metrics.json").read_text())
        rows.append(
            {
                "variant": name,
                "steps": metrics["steps"],
                "heldout_psnr_db": metrics["heldout_psnr_db"],
                "train_s": round(time.perf_counter() - started, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--px", type=int, default=1024)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--sd3", action="store_true", help="also time the SD3 decoder (about 2 min more)")
    q = sub.add_parser("quality")
    q.add_argument("--data", required=True, help="an emoji-world dataset folder")
    q.add_argument("--steps", type=int, default=600)
    q.add_argument("--max-images", type=int, default=4000)
    q.add_argument(
        "--variant",
        action="append",
        choices=list(VARIANTS),
        help="train only this variant (repeatable; default: all)",
    )
    q.add_argument("--threads", type=int, default=2, help="torch threads of each training run")
    for p in (s, q):
        p.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = (
        speed(args.px, args.runs, args.sd3)
        if args.what == "speed"
        else quality(args.data, args.steps, args.max_images, args.variant or list(VARIANTS), args.threads)
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
