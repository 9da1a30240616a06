"""Encode a dataset folder with a given autoencoder into the latent/text cache the pilot reads.

The same cache the trainer builds (``training_tools.data.build_cache``: safetensors shards,
frozen MiniLM states of every caption), for pilots that swap the autoencoder::

    python benchmarks/pilot_cache.py runs/s7/ae-se0.5/final runs/s7/cache-se0.5 \
        --data runs/pilot/data-single --text runs/emoji-v2/text-init

then ``python benchmarks/denoiser_pilot.py --run RUN --cache runs/s7/cache-se0.5 ...`` with a RUN
folder whose ``autoencoder/final`` is that autoencoder (it decodes the pilot's samples).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from snapgen_app.model.text_encoders import TextConditioner
    from training_tools.data import build_cache, module_fingerprint, scan_folder
    from training_tools.text import TextStep

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("autoencoder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, default=Path("runs/pilot/data-single"))
    p.add_argument("--text", type=Path, default=Path("runs/emoji-v2/text-init"))
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ae = SnapGenAutoencoder.from_pretrained(str(args.autoencoder), use_safetensors=True).eval()
    text = TextStep(TextConditioner.from_pretrained(args.text).eval())
    with torch.no_grad():
        cache = build_cache(
            scan_folder(args.data),
            args.out,
            resolution=args.resolution,
            buckets=False,
            bucket_step=64,
            encode_images=lambda images: ae.encode(images),
            encode_text=text.encode_frozen,
            encoder_id=module_fingerprint(ae) + text.fingerprint,
        )
    print(f"{len(cache)} images -> {args.out}")


if __name__ == "__main__":
    main()
