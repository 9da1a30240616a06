"""The text-to-image loop over a runtime bundle: tokenizer -> text encoder(s) -> seeded noise ->
flow-matching Euler steps over the UNet -> decoder -> uint8 images. Torch-free.

Reproducibility: image i's initial noise comes from ``np.random.Generator(PCG64(seeds[i]))``
drawing ``standard_normal((C, h, w), dtype=float32)``, one generator per image, and one prompt
embedding is computed once and repeated per image, so a batch of N equals N single runs with the
same seeds (up to the provider's batch-size-dependent kernels; bit-identical on the CPU provider in
our tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np

from model_store.bundle import NULL_CONDITIONS, BundleManifest
from snapgen_app.errors import BundleError, ConfigError
from snapgen_app.progress import CancelToken
from snapgen_app.runtime.sessions import RuntimeOptions, SessionCache
from snapgen_app.runtime.text import TextEmbedding, TextEncoderStack
from snapgen_app.runtime.tokenizer import PromptTokenizer

from .sampler import flow_sigmas, sample_euler

log = logging.getLogger(__name__)

UNET_INPUTS: tuple[str, ...] = ("sample", "timestep", "encoder_hidden_states")
UNET_OPTIONAL_INPUTS: tuple[str, ...] = ("pooled_text",)
UNET_OUTPUT = "velocity"
DECODER_INPUT = "latent"
DECODER_OUTPUT = "image"
PREVIEW_MAX_SIDE = 256
TIMESTEP_SCALE = 1000.0  # the UNet sees t * 1000 (diffusers/SD3 convention)

#: What the UNet sees as "no prompt" under classifier-free guidance (the text conditioner's drop_mode).
NullCondition = Literal["empty_prompt", "zeros"]
#: ``on_step(step, total, t, preview)``: preview is uint8 [H, W, 3] or None. May raise to stop.
StepHandler = Callable[[int, int, float, "np.ndarray | None"], None]


def initial_noise(seeds: Sequence[int], channels: int, height: int, width: int) -> np.ndarray:
    """Seeded Gaussian noise float32 [N, channels, height, width], one PCG64 stream per seed.

    Drawn directly in float32 per image so the same seed gives the same noise in any batch.
    """
    draws = [
        np.random.Generator(np.random.PCG64(int(seed))).standard_normal(
            (channels, height, width), dtype=np.float32
        )
        for seed in seeds
    ]
    return np.stack(draws, axis=0)


def to_uint8_images(image: np.ndarray) -> np.ndarray:
    """Decoder output float32 [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (rounded, clipped)."""
    scaled = np.clip((image.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)
    return np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def size_stride(manifest: BundleManifest) -> int:
    """Pixels per latent-grid cell the UNet can halve down to: vae_scale_factor * 2**(stages - 1).

    ``stages`` is the length of ``model.unet["block_channels"]``; when the key is absent or not a
    list the stride falls back to vae_scale_factor alone (the decoder's own requirement).
    """
    blocks = manifest.model.unet.get("block_channels")
    stages = len(blocks) if isinstance(blocks, (list, tuple)) and blocks else 1
    return int(manifest.model.vae_scale_factor) * 2 ** (stages - 1)


@dataclass
class PipelineOutput:
    """``images``: uint8 [N, H, W, 3]; ``timings``: seconds per component; ``warnings``: for the user."""

    images: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class TextToImagePipeline:
    """One bundle at one precision on one provider list; sessions are created lazily and cached."""

    def __init__(
        self,
        root: Path,
        manifest: BundleManifest,
        precision: str,
        providers: Sequence[str],
        options: RuntimeOptions | None = None,
        sessions: SessionCache | None = None,
        null_condition: NullCondition | None = None,
    ) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.precision = precision
        self.providers = tuple(providers)
        self.options = options or RuntimeOptions()
        cache = sessions if sessions is not None else SessionCache()
        variant = manifest.variant(precision)
        encoder_files = list(variant.text_encoder) or [spec.file for spec in manifest.model.text_encoders]
        if len(encoder_files) != len(manifest.model.text_encoders):
            raise BundleError(
                f"bundle {manifest.name!r}: variant {precision} lists {len(encoder_files)} text encoder files "
                f"for {len(manifest.model.text_encoders)} text encoders"
            )
        self._encoder_files = encoder_files
        self._cache = cache
        self.unet = cache.get(self.root / variant.unet, self.providers, self.options)
        self.decoder = cache.get(self.root / variant.decoder, self.providers, self.options)
        self._text: TextEncoderStack | None = None
        self._preview_projection: np.ndarray | None = None
        # None: what the bundle records (the text dropout the model was trained with)
        null_condition = null_condition or cast(NullCondition, manifest.model.null_condition)
        if null_condition not in NULL_CONDITIONS:
            raise ConfigError("null_condition", f"{null_condition!r}", allowed=list(NULL_CONDITIONS))
        self.null_condition: NullCondition = null_condition

    # -- loading -------------------------------------------------------------------------------

    @property
    def text(self) -> TextEncoderStack:
        """Tokenizers + text encoder sessions (tokenizers are read on first use)."""
        if self._text is None:
            parts = []
            for spec, file in zip(self.manifest.model.text_encoders, self._encoder_files, strict=True):
                tokenizer = PromptTokenizer.from_file(
                    self.root / spec.tokenizer, spec.max_length, spec.pad_to_max_length
                )
                parts.append((tokenizer, self._cache.get(self.root / file, self.providers, self.options)))
            self._text = TextEncoderStack(parts)
        return self._text

    def load(self) -> float:
        """Create every session now (otherwise done on first use); returns the seconds it took."""
        start = time.perf_counter()
        for _, session in self.text.parts:
            _ = session.inference_session
        self.unet.require_io(UNET_INPUTS, (UNET_OUTPUT,))
        unknown = [n for n in self.unet.input_names if n not in UNET_INPUTS + UNET_OPTIONAL_INPUTS]
        if unknown:
            raise BundleError(
                f"{self.unet.path.name}: inputs {unknown} are not part of the runtime bundle format "
                f"(expected {list(UNET_INPUTS + UNET_OPTIONAL_INPUTS)})",
                hint="re-export the bundle with `snapgen export`",
            )
        self.decoder.require_io((DECODER_INPUT,), (DECODER_OUTPUT,))
        return time.perf_counter() - start

    @property
    def provider_used(self) -> str:
        """The provider that actually runs the UNet (after onnxruntime's own fallback)."""
        return self.unet.provider_used

    @property
    def stride(self) -> int:
        return size_stride(self.manifest)

    def check_size(self, width: int, height: int) -> None:
        """Raise ConfigError unless width and height are positive multiples of the stride."""
        stride = self.stride
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % stride:
                lower = max(stride, value - value % stride)
                raise ConfigError(
                    name,
                    f"{value} is not a multiple of {stride} (this model's stride)",
                    hint=f"use {lower} or {lower + stride}",
                )

    # -- stages --------------------------------------------------------------------------------

    def encode_prompt(
        self, prompt: str, with_unconditional: bool
    ) -> tuple[TextEmbedding, TextEmbedding | None]:
        """Embedding of ``prompt`` (batch 1) and, for CFG, the null condition (batch 1): the empty
        prompt's embedding, or zeros of the same shape when the model was trained with
        ``drop_mode="zeros"`` (``null_condition``).

        Prompt and "" are encoded in one batch so that, without fixed padding, they share a length.
        """
        if with_unconditional and self.null_condition == "zeros":
            cond = self.text.encode([prompt])
            zeros = TextEmbedding(np.zeros_like(cond.tokens), np.zeros_like(cond.pooled), (False,))
            return cond, zeros
        prompts = [prompt, ""] if with_unconditional else [prompt]
        both = self.text.encode(prompts)
        cond = both.take([0])
        return cond, (both.take([1]) if with_unconditional else None)

    def _velocity(
        self, cond: TextEmbedding, uncond: TextEmbedding | None, guidance_scale: float, batch: int
    ) -> Callable[[np.ndarray, float], np.ndarray]:
        """The denoiser for the sampler: UNet velocity, with classifier-free guidance when ``uncond``."""
        rows = [0] * batch
        tokens, pooled = cond.take(rows).tokens, cond.take(rows).pooled
        if uncond is not None:
            tokens = np.concatenate([uncond.take(rows).tokens, tokens], axis=0)
            pooled = np.concatenate([uncond.take(rows).pooled, pooled], axis=0)
        wants_pooled = "pooled_text" in self.unet.input_names

        def denoise(x: np.ndarray, t: float) -> np.ndarray:
            sample = np.concatenate([x, x], axis=0) if uncond is not None else x
            feeds = {
                "sample": sample,
                "timestep": np.full((sample.shape[0],), t * TIMESTEP_SCALE, dtype=np.float32),
                "encoder_hidden_states": tokens,
            }
            if wants_pooled:
                feeds["pooled_text"] = pooled
            velocity = self.unet.run(feeds, (UNET_OUTPUT,))[UNET_OUTPUT].astype(np.float32, copy=False)
            if uncond is None:
                return velocity
            v_uncond, v_cond = velocity[:batch], velocity[batch:]
            return v_uncond + np.float32(guidance_scale) * (v_cond - v_uncond)

        return denoise

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Diffusion-space latents float32 [N, C, h, w] -> uint8 images [N, H, W, 3].

        Raises BundleError when the decoder returns NaN/inf (e.g. an fp16 overflow). Images are
        decoded one at a time: the decoder's full-resolution activations are its largest tensors
        (about 400 MB per 1024 px image), so a batch of 64 would need tens of GB at once."""
        latents = latents.astype(np.float32, copy=False)
        parts = [
            self.decoder.run({DECODER_INPUT: latents[i : i + 1]}, (DECODER_OUTPUT,))[DECODER_OUTPUT]
            for i in range(latents.shape[0])
        ]
        image = np.concatenate(parts)
        if image.ndim != 4 or image.shape[1] != 3:
            raise BundleError(
                f"{self.decoder.path.name}: output 'image' has shape {image.shape}, expected [N, 3, H, W]"
            )
        if not np.all(np.isfinite(image)):
            raise BundleError(
                f"{self.decoder.path.name} produced NaN or infinite pixels (precision {self.precision})",
                hint="try --precision fp32",
            )
        return to_uint8_images(image)

    # -- preview -------------------------------------------------------------------------------

    def preview_projection(self) -> np.ndarray:
        """Linear latent -> RGB map float32 [C + 1, 3] (last row: bias), estimated once per bundle.

        Estimated by least squares from the decoder itself: a few seeded random latents (8x8 grid
        when the decoder accepts any size) are decoded, the images average-pooled back to the latent
        grid, and RGB regressed on the latent channels. Falls back to a fixed grey approximation
        (the channel mean, mapped to all of R, G, B) when the decoder cannot be run that way.
        """
        if self._preview_projection is None:
            try:
                self._preview_projection = self._estimate_projection()
            except Exception as exc:  # a fixed-shape or fussy decoder must never break generation
                log.info("latent preview: using the fixed approximation (%s)", exc)
                channels = self.manifest.model.latent_channels
                grey = np.zeros((channels + 1, 3), dtype=np.float32)
                grey[:channels] = 1.0 / channels
                self._preview_projection = grey
        return self._preview_projection

    def _estimate_projection(self) -> np.ndarray:
        channels = self.manifest.model.latent_channels
        factor = self.manifest.model.vae_scale_factor
        shape = self.decoder.inference_session.get_inputs()[0].shape
        h = shape[2] if isinstance(shape[2], int) else 8
        w = shape[3] if isinstance(shape[3], int) else 8
        batch = shape[0] if isinstance(shape[0], int) else 4
        latents = initial_noise(range(batch), channels, h, w)
        out = self.decoder.run({DECODER_INPUT: latents}, (DECODER_OUTPUT,))[DECODER_OUTPUT]
        pooled = out.reshape(batch, 3, h, out.shape[2] // h, w, out.shape[3] // w).mean(axis=(3, 5))
        if out.shape[2] != h * factor:
            log.info("latent preview: decoder upsamples by %d, manifest says %d", out.shape[2] // h, factor)
        design = np.concatenate(
            [latents.transpose(0, 2, 3, 1).reshape(-1, channels), np.ones((batch * h * w, 1))], 1
        )
        target = pooled.transpose(0, 2, 3, 1).reshape(-1, 3)
        solution, *_ = np.linalg.lstsq(design.astype(np.float64), target.astype(np.float64), rcond=None)
        return solution.astype(np.float32)

    def latent_preview(self, latents: np.ndarray) -> np.ndarray:
        """Cheap preview of the first image: float32 [N, C, h, w] -> uint8 [h*k, w*k, 3] with
        k = max(1, 256 // max(h, w)) (nearest-neighbour upscale)."""
        projection = self.preview_projection()
        first = latents[0].astype(np.float32)
        rgb = np.einsum("chw,ck->hwk", first, projection[:-1]) + projection[-1]
        pixels = np.rint(np.clip((rgb + 1.0) * 127.5, 0, 255)).astype(np.uint8)
        k = max(1, PREVIEW_MAX_SIDE // max(pixels.shape[0], pixels.shape[1]))
        return np.repeat(np.repeat(pixels, k, axis=0), k, axis=1)

    # -- the whole loop ------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        seeds: Sequence[int],
        *,
        steps: int,
        width: int,
        height: int,
        shift: float,
        guidance_scale: float,
        preview: bool = False,
        on_step: StepHandler | None = None,
        cancel: CancelToken | None = None,
    ) -> PipelineOutput:
        """Generate ``len(seeds)`` images of ``prompt``; returns uint8 [N, height, width, 3].

        ``on_step`` runs after every UNet step (with a preview when ``preview``); ``cancel`` is
        checked before each stage and after every step, so a cancel stops within one step
        (raises Cancelled).
        """
        sigmas = flow_sigmas(steps, shift)
        self.check_size(width, height)
        if not seeds:
            raise ConfigError("num_images", "must be >= 1")
        output = PipelineOutput(images=np.zeros((0,), np.uint8))
        _raise_if_cancelled(cancel)

        start = time.perf_counter()
        use_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, with_unconditional=use_cfg)
        output.timings["text_encoder"] = time.perf_counter() - start
        if cond.truncated[0]:
            # The encoder with the smallest limit is the first (or only) one to cut the prompt.
            limit = min(t.max_length for t, _ in self.text.parts)
            output.warnings.append(f"the prompt was longer than {limit} tokens and was truncated")
        _raise_if_cancelled(cancel)

        factor = self.manifest.model.vae_scale_factor
        noise = initial_noise(seeds, self.manifest.model.latent_channels, height // factor, width // factor)
        denoise = self._velocity(cond, uncond, guidance_scale, len(seeds))
        preview_seconds = 0.0

        def callback(step: int, total: int, t: float, _x: np.ndarray, denoised: np.ndarray) -> None:
            nonlocal preview_seconds
            image = None
            if preview:
                started = time.perf_counter()
                image = self.latent_preview(denoised)
                preview_seconds += time.perf_counter() - started
            if on_step is not None:
                on_step(step, total, t, image)
            _raise_if_cancelled(cancel)

        start = time.perf_counter()
        latents = sample_euler(denoise, noise, sigmas, callback)
        unet_seconds = time.perf_counter() - start - preview_seconds
        output.timings["unet"] = unet_seconds
        output.timings["unet_per_step"] = unet_seconds / steps
        if preview:
            output.timings["preview"] = preview_seconds

        start = time.perf_counter()
        output.images = self.decode(latents)
        output.timings["decoder"] = time.perf_counter() - start
        if output.images.shape[1:3] != (height, width):
            raise BundleError(
                f"{self.decoder.path.name} returned {output.images.shape[2]}x{output.images.shape[1]} images "
                f"for {width}x{height}; vae_scale_factor {factor} in bundle.json may be wrong"
            )
        return output


def _raise_if_cancelled(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()
