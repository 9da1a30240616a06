"""EmojiEval generators for the recipe: a torch checkpoint (diffusers layout) or a runtime bundle.

Each generator is ``generate(texts, seeds) -> list of [128, 128, 3] uint8`` as
:func:`training_tools.emoji_world.eval.evaluate` wants it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_store.bundle import recorded_shift
from training_tools.emoji_world.eval import GenerateFn, evaluate, load_classifier, make_prompts, write_images


def checkpoint_generator(
    checkpoint: Path, steps: int, guidance: float, *, threads: int = 2, resolution: int = 128
) -> GenerateFn:
    """Euler sampling (with CFG when ``guidance`` > 1) of a checkpoint's EMA UNet, bf16 autocast
    where the CPU computes in bf16.

    Noise: one seeded torch generator per image (batch-independent); shift from model_index.json.
    """
    import torch

    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from snapgen_app.model.text_encoders import TextConditioner
    from snapgen_app.model.unet import SnapGenUNet
    from training_tools import flow
    from training_tools.precision import cpu_has_fast_bf16
    from training_tools.samples import make_denoiser, seeded_noise

    torch.set_num_threads(threads)
    bf16 = cpu_has_fast_bf16()  # fp32 on a CPU without bf16 kernels (training_tools.precision)
    index = json.loads((checkpoint / "model_index.json").read_text())
    shift = recorded_shift(index) or 1.0
    unet = SnapGenUNet.from_pretrained(str(checkpoint / "unet"), use_safetensors=True).eval()
    autoencoder = SnapGenAutoencoder.from_pretrained(
        str(checkpoint / "autoencoder"), use_safetensors=True
    ).eval()
    text = TextConditioner.from_pretrained(checkpoint / "text_conditioner").eval()
    use_pooled = unet.unet_config.pooled_dim > 0
    side = resolution // autoencoder.scale_factor
    channels = unet.unet_config.in_channels

    @torch.no_grad()
    def generate(texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        tokens, pooled = text.encode(texts)
        uncond = text.unconditional(len(texts)) if guidance > 1.0 else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            den = make_denoiser(
                unet,
                tokens,
                pooled if use_pooled else None,
                guidance,
                None if uncond is None else (uncond[0], uncond[1] if use_pooled else None),
            )
            latents = flow.euler_sample(den, seeded_noise(seeds, (channels, side, side)), steps, shift)
        images = autoencoder.decode(latents.float())
        array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [np.ascontiguousarray(a) for a in array]

    return generate


def bundle_generator(
    bundle: Path, precision: str, steps: int, guidance: float, manifest: Any = None
) -> GenerateFn:
    """Generation through the torch-free runtime (onnxruntime on the CPU), one prompt at a time;
    ``manifest`` (default: the folder's ``bundle.json``) names the files and the sampling shift."""
    from model_store.bundle import read_manifest
    from snapgen_app.pipeline.text_to_image import TextToImagePipeline

    manifest = manifest if manifest is not None else read_manifest(bundle)
    pipeline = TextToImagePipeline(bundle, manifest, precision, ["CPUExecutionProvider"])
    defaults = manifest.defaults

    def generate(texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        out = []
        for text, seed in zip(texts, seeds, strict=True):
            result = pipeline.generate(
                text,
                [seed],
                steps=steps,
                width=128,
                height=128,
                shift=defaults.shift,
                guidance_scale=guidance,
            )
            out.append(np.asarray(result.images[0]))
        return out

    return generate


def run_eval(
    generate: GenerateFn,
    classifier: Path,
    per_category: int,
    images_dir: Path | None = None,
    with_frechet: bool = True,
) -> dict[str, Any]:
    """EmojiEval with ``per_category`` prompts per category; the images are kept in ``images_dir``.
    ``with_frechet=False`` skips the Frechet distance (it renders real images: needs the emoji font)."""
    _, classes = load_classifier(classifier)
    prompts = make_prompts(classes, per_category)
    kept: list[np.ndarray] = []

    def keeping(texts: list[str], seeds: list[int]) -> Sequence[np.ndarray]:
        images = generate(texts, seeds)
        kept.extend(images)
        return images

    report = evaluate(keeping, classifier, prompts=prompts, with_frechet=with_frechet)
    if images_dir is not None:
        write_images(images_dir, kept, prompts)
    return report.to_dict()


@contextlib.contextmanager
def checkpoint_folder(path: Path) -> Iterator[Path]:
    """A final-checkpoint folder for ``path``: itself when it is one (model_index.json), else a
    trainer checkpoint (``RUN/checkpoints/step-N``) written as the final folder of that step in a
    temporary directory, removed afterwards."""
    if (path / "model_index.json").is_file():
        yield path
        return
    from training_tools.models import final_from_checkpoint

    with tempfile.TemporaryDirectory(prefix="snapgen-ckpt-") as tmp:
        yield final_from_checkpoint(path, Path(tmp) / "final")
