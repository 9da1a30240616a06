"""How much high-frequency energy do an autoencoder's latents carry, next to the images themselves?

For each autoencoder folder (diffusers layout, ``SnapGenAutoencoder``), on the first ``--images``
images of a dataset folder:

- ``latent_hf``: mean squared difference of horizontally neighbouring latent cells over the
  per-image spatial variance (0 for a constant map, 2 for white noise);
- ``image_hf``: the same for the images area-downsampled to the latent's size (what a latent as
  smooth as the image would show);
- ``lowpass_psnr_db``: PSNR of decode(2x-average-pooled latent, nearest-upsampled) against the
  2x-average-pooled image, upsampled the same way: does a coarse latent decode to a coarse image?

    python benchmarks/latent_smoothness.py runs/emoji-v2/autoencoder/final runs/s7/ae-se0.5/final \
        --data runs/pilot/data-single

Diffusion has to generate every latent frequency; latents rougher than their images make it
harder (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def high_frequency_ratio(x: torch.Tensor) -> float:
    d = x - x.mean((2, 3), keepdim=True)
    return float((d[..., 1:] - d[..., :-1]).pow(2).mean() / d.pow(2).mean())


def measure(autoencoder: Path, images: torch.Tensor) -> dict[str, float]:
    from snapgen_app.model.autoencoder import SnapGenAutoencoder

    ae = SnapGenAutoencoder.from_pretrained(str(autoencoder), use_safetensors=True).eval()
    with torch.no_grad():
        z = ae.encode_moments(images)[0].float()
        factor = images.shape[-1] // z.shape[-1]
        coarse = F.interpolate(ae.decoder(F.avg_pool2d(z, 2)).float(), scale_factor=2, mode="nearest")
        target = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="nearest")
        mse = float((coarse.clamp(-1, 1) - target).pow(2).mean())
    return {
        "latent_hf": high_frequency_ratio(z),
        "image_hf": high_frequency_ratio(F.avg_pool2d(images, factor)),
        "lowpass_psnr_db": 10 * float(np.log10(4.0 / mse)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("autoencoders", nargs="+", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--images", type=int, default=128)
    args = p.parse_args()
    from training_tools.autoencoder_trainer import load_images, to_float

    files = sorted(args.data.glob("*.png"))[: args.images]
    images = to_float(load_images([str(f) for f in files], 128))
    for path in args.autoencoders:
        print(json.dumps({"autoencoder": str(path), "images": len(files), **measure(path, images)}))


if __name__ == "__main__":
    main()
