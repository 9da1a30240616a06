"""Where along the sampling trajectory does a trained denoiser lose an object's shape?

Two probes of one training checkpoint (a diffusers-layout folder with ``unet/``, ``autoencoder/``,
``text_conditioner/``, e.g. ``runs/RUN/teacher/final``) on real single-object training images:

1. **One-step x0 error by noise level**: for t in a grid, noise real latents to x_t and compare the
   model's clean estimate x0 = x_t - t v against the latent, next to the error of taking x_t itself
   (ratio < 1: the model denoises better than doing nothing at that t).
2. **Restart from a real image (SDEdit)**: noise the real latents to t0 and run the sampler from t0
   to 0 (the given steps, shift, CFG). Rows of the written grid: the real images, then one row per
   t0. Where the shape survives from t0 but not from a higher t0, the model has not learned to make
   it from that much noise.

    python benchmarks/trajectory_probe.py runs/emoji-v3/teacher/final \
        --data runs/emoji-v3/data-denoiser --out runs/probe/teacher

Prints a table and writes ``probe.json`` and ``restart.png`` into ``--out``. A diagnostic script,
not product code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from training_tools import flow
from training_tools.samples import make_denoiser


def load(checkpoint: Path) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from snapgen_app.model.text_encoders import TextConditioner
    from snapgen_app.model.unet import SnapGenUNet

    unet = SnapGenUNet.from_pretrained(str(checkpoint / "unet"), use_safetensors=True).eval()
    ae = SnapGenAutoencoder.from_pretrained(str(checkpoint / "autoencoder"), use_safetensors=True).eval()
    text = TextConditioner.from_pretrained(checkpoint / "text_conditioner").eval()
    return unet, ae, text


def single_object_images(data: Path, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` single-object images of a dataset folder ([-1, 1] floats) and captions."""
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    from training_tools.autoencoder_trainer import load_images, to_float

    rows = [r for r in rows if r["kind"] == "single"][:count]
    images = load_images([str(data / r["file_name"]) for r in rows], 128)
    return to_float(images), [r["text"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, required=True, help="dataset folder with metadata.jsonl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=96, help="images for the x0-error table")
    p.add_argument("--grid", type=int, default=10, help="images in the restart grid")
    p.add_argument("--starts", default="0.5,0.7,0.85,0.95,1.0", help="restart noise levels t0")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    unet, ae, text = load(args.checkpoint)
    images, captions = single_object_images(args.data, max(args.images, args.grid))
    report: dict = {"checkpoint": str(args.checkpoint), "images": len(images), "x0_error": [], "restart": []}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = ae.encode(images).float()
        tokens, pooled = text.encode(captions)
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        print("    t   x0 error (model)   x0 error (x_t itself)   ratio")
        for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 0.95):
            x_t = (1 - t) * z + t * eps
            v = unet(x_t, torch.full((len(z),), t * 1000.0), tokens, pooled).float()
            model_err = float(((x_t - t * v - z) ** 2).mean())
            identity_err = float(((x_t - z) ** 2).mean())
            report["x0_error"].append({"t": t, "model": model_err, "identity": identity_err})
            print(f"{t:5.2f}   {model_err:16.4f}   {identity_err:21.4f}   {model_err / identity_err:5.3f}")

        n = args.grid
        denoise = make_denoiser(unet, tokens[:n], pooled[:n], args.guidance, text.unconditional(n))
        times = flow.schedule(args.steps, args.shift)
        rows = [images[:n]]
        for t0 in (float(s) for s in args.starts.split(",")):
            first = int((times >= t0 - 1e-6).nonzero().max())  # the schedule's last time >= t0
            x = (1 - times[first]) * z[:n] + times[first] * eps[:n]
            for i in range(first, args.steps):
                x = x + (times[i + 1] - times[i]) * denoise(x, times[i].expand(n))
            rows.append(ae.decode(x).float())
            report["restart"].append(
                {"t0": float(times[first]), "latent_mse": float(((x - z[:n]) ** 2).mean())}
            )
            print(
                f"restart from t0={float(times[first]):.3f}: latent MSE to the real image {report['restart'][-1]['latent_mse']:.4f}"
            )
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(args.out / "restart.png")
    report.update(captions=captions[:n], steps=args.steps, shift=args.shift, guidance=args.guidance)
    (args.out / "probe.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
