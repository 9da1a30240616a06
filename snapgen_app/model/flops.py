"""Parameter and FLOP counts of the SnapGen UNet, on the meta device (no memory, no compute).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: 2 x multiply-accumulates of
matmuls, linear layers, convolutions and attention; norms and activations are not counted. On real
CPU tensors ``scaled_dot_product_attention`` dispatches to a fused kernel that the counter does not
know (it counts 0 and under-reports a UNet by 12-16 %). On the meta device SDPA decomposes to
matmuls and is counted; :func:`sdpa_counted_on_meta` checks that, and the count falls back to the
math attention backend if a future torch changes it.

One "UNet step" = one forward at batch 1; an image of R px is a latent of R/8 (``vae_scale_factor``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from snapgen_app.config import UNetConfig
from snapgen_app.model.unet import SnapGenUNet

DEFAULT_TEXT_TOKENS = 77  # text tokens seen by cross-attention when counting (one CLIP-length prompt)


def attention_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    """Analytic FLOPs of softmax(Q K^T) V: two matmuls of 2 * B * H * N * L * d each."""
    return 4 * batch * heads * queries * keys * head_dim


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (works for meta tensors)."""
    return sum(p.numel() for p in model.parameters())


def build_on_meta(cfg: UNetConfig) -> SnapGenUNet:
    """The UNet for ``cfg`` with meta tensors: instant, allocates nothing."""
    with torch.device("meta"):
        return SnapGenUNet.from_unet_config(cfg)


@functools.cache
def sdpa_counted_on_meta() -> bool:
    """True when FlopCounterMode counts scaled_dot_product_attention on meta tensors exactly."""
    q = torch.empty(1, 2, 8, 16, device="meta")
    k = torch.empty(1, 2, 5, 16, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, k)
    return counter.get_total_flops() == attention_flops(1, 2, 8, 5, 16)


@contextlib.contextmanager
def _counted_attention() -> Iterator[None]:
    """Force the math SDPA backend (plain matmuls) unless meta already counts attention."""
    if sdpa_counted_on_meta():
        yield
    else:
        with sdpa_kernel(SDPBackend.MATH):
            yield


def example_inputs(
    cfg: UNetConfig,
    resolution: int,
    *,
    batch: int = 1,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    device: str = "meta",
) -> dict[str, torch.Tensor | None]:
    """Forward kwargs for an ``resolution`` px square image (latent resolution / vae_scale_factor).

    Text models get ``text_tokens`` context tokens [B, L, context_dim] (and pooled text when the
    model takes it); class-conditional models get class labels and attend to their class token.
    """
    cfg.check_pixel_size(resolution, resolution)
    side = resolution // cfg.vae_scale_factor
    text = cfg.num_classes == 0
    return {
        "sample": torch.zeros(batch, cfg.in_channels, side, side, device=device),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": torch.zeros(batch, text_tokens, cfg.context_dim, device=device)
        if text
        else None,
        "pooled_text": torch.zeros(batch, cfg.pooled_dim, device=device) if cfg.pooled_dim > 0 else None,
        "class_labels": None if text else torch.zeros(batch, dtype=torch.long, device=device),
    }


def unet_flops(
    cfg: UNetConfig,
    resolution: int,
    *,
    model: SnapGenUNet | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
) -> int:
    """FLOPs of one UNet forward at batch 1 for a ``resolution`` px square image.

    ``model`` (a meta-device SnapGenUNet for ``cfg``) can be passed to reuse one build across sizes.
    """
    model = model if model is not None else build_on_meta(cfg)
    inputs = example_inputs(cfg, resolution, text_tokens=text_tokens)
    with torch.no_grad(), _counted_attention(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return int(counter.get_total_flops())
