"""The SnapGen efficient UNet (CVPR 2025), one readable file.

Layout (3 stages by default, highest resolution first; see docs/architecture.md)::

    conv_in 3x3 -> [down stage: (ResBlock -> Transformer?) x down_layers, Downsample] x stages
                -> mid: ResBlock -> Transformer(mid depth) -> ResBlock
                -> [up stage: (cat skip -> ResBlock -> Transformer?) x up_layers, Upsample] x stages
                -> GroupNorm -> SiLU -> conv_out 3x3

ResBlock (separable): norm -> SiLU -> depthwise 3x3 -> pointwise to hidden (= conv_expansion x C)
-> norm with timestep scale/shift -> SiLU -> depthwise 3x3 -> pointwise to C (zero-initialised).
Transformer block: [self-attention] -> [cross-attention] -> FFN (GEGLU), pre-LayerNorm, multi-query
attention (one K/V head), RMSNorm on per-head q/k, 2-D RoPE in self-attention.

Everything is a field of :class:`snapgen_app.config.UNetConfig`. The code avoids baking shapes into
Python ints (RoPE tables are computed from the runtime h, w; reshapes use flatten/unflatten) so the
network exports to ONNX with dynamic batch and spatial size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from snapgen_app.config import UNetConfig
from snapgen_app.errors import UsageError

# ---------------------------------------------------------------------------------------------
# Building blocks


def timestep_features(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] (cos first) of ``timestep`` [B] float (t * 1000)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, written out so it exports to any ONNX opset."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


def rope_2d(
    height: int, width: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [h*w, head_dim/2] for 2-D RoPE on a row-major h x w token grid.

    The first half of the rotated angles encodes the row, the second the column; each angle rotates
    the pair (i, i + head_dim/2) of a head ("rotate half" layout). ``height``/``width`` come from the
    runtime tensor shape, so the tables follow the input size in an exported graph.
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    ys = torch.arange(height, dtype=torch.float32, device=device)[:, None] * freqs[None, :]  # [h, q]
    xs = torch.arange(width, dtype=torch.float32, device=device)[:, None] * freqs[None, :]  # [w, q]
    angle_y = ys[:, None, :].expand(-1, xs.shape[0], -1)
    angle_x = xs[None, :, :].expand(ys.shape[0], -1, -1)
    angles = torch.cat([angle_y, angle_x], dim=-1).flatten(0, 1)  # [h*w, head_dim/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, N, head_dim] by tables [N, head_dim/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# Training on a CPU: below this many attention scores per head (query tokens x key tokens), the math
# kernel's backward beats PyTorch's CPU flash-attention backward, which pays a block-sized cost per
# (batch, head). Measured on the 2-core CPU, torch 2.13, bf16 autocast, forward + backward
# (docs/training.md, session 11): 16x16 scores 8.7x faster, 64x24 5.1x, 256x24 1.6x, 512x77 1.3x,
# 1024x24 1.0x; 256x256 0.8x, 1024x77 0.9x, 1024x1024 0.4x. Inference keeps the flash kernel (it is
# as fast or faster there), and so do the ONNX exports (they trace without gradients).
MATH_ATTENTION_MAX_SCORES = 40_000


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, on the math kernel when training small attentions on a CPU."""
    if q.requires_grad and q.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= MATH_ATTENTION_MAX_SCORES:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Self- or cross-attention with ``kv_heads`` K/V heads shared by groups of query heads.

    K/V heads are broadcast to the query heads with ``expand`` (a view, no copy in eager) rather
    than ``enable_gqa=True``, because the TorchScript ONNX exporter rejects ``enable_gqa``.
    """

    def __init__(self, dim: int, context_dim: int | None, cfg: UNetConfig, use_rope: bool) -> None:
        super().__init__()
        self.head_dim = cfg.attention_head_dim
        self.heads = dim // self.head_dim
        self.kv_heads = cfg.kv_heads or self.heads
        kv_in = context_dim if context_dim is not None else dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_in, self.kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(kv_in, self.kv_heads * self.head_dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.use_rope = use_rope

    def _kv_to_query_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, kv_heads, L, d] -> [B, heads, L, d]."""
        if self.kv_heads == self.heads:
            return t
        group = self.heads // self.kv_heads
        return t.unsqueeze(2).expand(-1, -1, group, -1, -1).flatten(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, N, dim], context [B, L, context_dim] (None = self-attention) -> [B, N, dim]."""
        source = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k = self.to_k(source).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.to_v(source).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        q, k = self.norm_q(q), self.norm_k(k)
        if self.use_rope and rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, self._kv_to_query_heads(k), self._kv_to_query_heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """GEGLU (or GELU) MLP with hidden width ``ffn_expansion x dim``.

    :meth:`split_gate` (used by the ONNX export, not a config field) gives the GEGLU's value and gate
    halves their own linears, copies of the halves of ``proj_in``: the same numbers, but the exported
    graph has two weight MatMuls with constant weights (each quantizable) and no Slice passes over the
    widest activation of the network (about 5 % of an int8 UNet step at 1024 px on a CPU). Unsplit,
    a plain ``nn.Linear`` GEGLU runs the same two linears on row views of ``proj_in`` (no copies, so
    training updates the one weight); the export needs the copies, whose weights trace as constants
    rather than as Slice nodes on a weight.
    """

    def __init__(self, dim: int, cfg: UNetConfig) -> None:
        super().__init__()
        inner = round(cfg.ffn_expansion * dim)
        self.gated = cfg.ffn_type == "geglu"
        self.proj_in = nn.Linear(dim, inner * 2 if self.gated else inner)
        self.proj_out = nn.Linear(inner, dim)
        self.gate_halves: nn.ModuleList | None = None  # (value, gate) while split

    def split_gate(self, on: bool) -> bool:
        """Split (``on``) or rejoin the GEGLU projection; True when it is split afterwards.

        Only a plain ``nn.Linear`` splits: a LoRA-wrapped ``proj_in`` (peft) must run whole, since
        copies of its base weight would drop the adapter. The halves are new modules holding copies
        (not views sliced in ``forward``), so every exporter sees constant weights.
        """
        self.gate_halves = None
        if not (on and self.gated and type(self.proj_in) is nn.Linear):
            return False
        inner = self.proj_out.in_features
        halves = nn.ModuleList()
        for rows in (slice(0, inner), slice(inner, 2 * inner)):
            weight = self.proj_in.weight
            half = nn.Linear(weight.shape[1], inner, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                half.weight.copy_(weight[rows])
                half.bias.copy_(self.proj_in.bias[rows])
            halves.append(half)
        self.gate_halves = halves
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_halves is not None:
            value, gate = self.gate_halves
            return self.proj_out(value(x) * F.gelu(gate(x)))
        if self.gated and type(self.proj_in) is nn.Linear:
            # The halves' rows as two linears: the same numbers as chunking one output, but no
            # strided half-views for the GELU and the product to walk (a CPU training step of the
            # emoji presets, bf16: the FFN at 16x16 tokens 14.2 -> 11.0 ms forward + backward).
            inner = self.proj_out.in_features
            weight, bias = self.proj_in.weight, self.proj_in.bias
            value = F.linear(x, weight[:inner], None if bias is None else bias[:inner])
            gate = F.linear(x, weight[inner:], None if bias is None else bias[inner:])
            return self.proj_out(value * F.gelu(gate))
        h = self.proj_in(x)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(h)


class TransformerBlock(nn.Module):
    """Pre-norm [self-attention] -> [cross-attention] -> FFN on tokens [B, N, dim]."""

    def __init__(self, dim: int, cfg: UNetConfig, self_attention: bool, cross_attention: bool) -> None:
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = Attention(dim, None, cfg, use_rope=cfg.rope) if self_attention else None
        self.norm_ca = nn.LayerNorm(dim) if cross_attention else None
        self.cross_attn = Attention(dim, cfg.context_dim, cfg, use_rope=False) if cross_attention else None
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, cfg)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        if self.self_attn is not None and self.norm_sa is not None:
            x = x + self.self_attn(self.norm_sa(x), rope=rope)
        # No context (a text model called unconditionally) skips cross-attention.
        if self.cross_attn is not None and self.norm_ca is not None and context is not None:
            x = x + self.cross_attn(self.norm_ca(x), context=context)
        return x + self.ff(self.norm_ff(x))


class Transformer2D(nn.Module):
    """GroupNorm -> linear in -> ``depth`` TransformerBlocks -> linear out (zero-init) + residual."""

    def __init__(
        self, dim: int, depth: int, cfg: UNetConfig, self_attention: bool, cross_attention: bool
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, cfg, self_attention, cross_attention) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.needs_rope = self_attention and cfg.rope
        self.head_dim = cfg.attention_head_dim
        self.rope_theta = cfg.rope_theta

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, h, w] -> (x [B, C, h, w], last block tokens [B, h*w, C])."""
        height, width = x.shape[-2], x.shape[-1]
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        rope = rope_2d(height, width, self.head_dim, self.rope_theta, x.device) if self.needs_rope else None
        for block in self.blocks:
            tokens = block(tokens, context, rope)
        out = self.proj_out(tokens).transpose(1, 2).reshape_as(x)
        return x + out, tokens


def conv3x3(in_ch: int, out_ch: int, separable: bool, stride: int = 1) -> nn.Module:
    """Dense 3x3 conv, or depthwise 3x3 + pointwise 1x1 when ``separable``."""
    if not separable:
        return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch), nn.Conv2d(in_ch, out_ch, 1)
    )


class ResBlock(nn.Module):
    """Res block with timestep scale/shift on the hidden width; see the module docstring."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig) -> None:
        super().__init__()
        hidden = cfg.res_hidden_channels(out_ch)
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_ch, eps=1e-5)
        self.conv1 = conv3x3(in_ch, hidden, cfg.separable_conv)
        self.time_proj = nn.Linear(cfg.time_embed_dim, 2 * hidden)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, hidden, eps=1e-5)
        self.conv2 = conv3x3(hidden, out_ch, cfg.separable_conv)
        last = [m for m in self.conv2.modules() if isinstance(m, nn.Conv2d)][-1]
        # Zero-initialised output: each res block starts as the identity (stable from-scratch training).
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [B, in, h, w], temb [B, time_embed_dim] -> [B, out, h, w]."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (separable when ``separable_resample``)."""

    def __init__(self, ch: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.conv = conv3x3(ch, ch, cfg.separable_resample, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x then 3x3 conv (separable when ``separable_resample``)."""

    def __init__(self, ch: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.conv = conv3x3(ch, ch, cfg.separable_resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One resolution level: pairs of (ResBlock, optional Transformer2D) and an optional resampler."""

    resnets: nn.ModuleList
    attentions: nn.ModuleList
    resample: nn.Module | None

    def __init__(
        self, in_channels: list[int], out_ch: int, depth: int, sa: bool, ca: bool, cfg: UNetConfig
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(c, out_ch, cfg) for c in in_channels)
        self.attentions = nn.ModuleList(
            Transformer2D(out_ch, depth, cfg, sa, ca) for _ in in_channels if depth > 0
        )
        self.resample: nn.Module | None = None


# ---------------------------------------------------------------------------------------------
# The model

_FIELDS = tuple(f.name for f in dataclasses.fields(UNetConfig))


class SnapGenUNet(ModelMixin, ConfigMixin):
    """SnapGen UNet predicting the flow-matching velocity; diffusers save/load with safetensors.

    The diffusers config (``config.json``) holds exactly the :class:`UNetConfig` fields. Build from
    a config with :meth:`from_unet_config`; call ``enable_gradient_checkpointing()`` for training.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        block_channels: tuple[int, ...] = (256, 512, 896),
        down_layers: tuple[int, ...] = (2, 2, 2),
        up_layers: tuple[int, ...] = (3, 3, 3),
        transformer_depth: tuple[int, ...] = (1, 2, 4),
        mid_transformer_depth: int = 1,
        self_attention: tuple[bool, ...] = (False, False, True),
        cross_attention: tuple[bool, ...] = (True, True, True),
        mid_self_attention: bool = True,
        mid_cross_attention: bool = True,
        separable_conv: bool = True,
        separable_resample: bool = False,
        conv_expansion: float = 2.0,
        ffn_expansion: float = 3.0,
        ffn_type: str = "geglu",
        attention_head_dim: int = 64,
        kv_heads: int | None = 1,
        qk_norm: bool = True,
        rope: bool = True,
        rope_theta: float = 10000.0,
        context_dim: int = 2048,
        pooled_dim: int = 2048,
        num_classes: int = 0,
        norm_groups: int = 32,
        time_embed_dim: int = 1024,
        time_freq_dim: int = 256,
        vae_scale_factor: int = 8,
    ) -> None:
        super().__init__()
        values = dict(locals())
        cfg = UNetConfig.from_dict({name: values[name] for name in _FIELDS})
        self._unet_config = cfg
        self.gradient_checkpointing = False
        chans = cfg.block_channels

        # Conditioning: timestep MLP (+ pooled text MLP, SDXL style) (+ class embedding).
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_freq_dim, cfg.time_embed_dim),
            nn.SiLU(),
            nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim),
        )
        self.pooled_mlp = (
            nn.Sequential(
                nn.Linear(cfg.pooled_dim, cfg.time_embed_dim),
                nn.SiLU(),
                nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim),
            )
            if cfg.pooled_dim > 0
            else None
        )
        # One extra row: index num_classes is the null class (unconditional, for guidance).
        self.class_embedding = (
            nn.Embedding(cfg.num_classes + 1, cfg.time_embed_dim) if cfg.num_classes > 0 else None
        )
        # Class-conditional models attend to one learned token per class in cross-attention.
        self.class_tokens = (
            nn.Embedding(cfg.num_classes + 1, cfg.context_dim) if cfg.num_classes > 0 else None
        )

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)

        skip_channels = [chans[0]]
        self.down_stages = nn.ModuleList()
        ch = chans[0]
        for i, out_ch in enumerate(chans):
            ins = [ch] + [out_ch] * (cfg.down_layers[i] - 1)
            stage = Stage(
                ins, out_ch, cfg.transformer_depth[i], cfg.self_attention[i], cfg.cross_attention[i], cfg
            )
            skip_channels += [out_ch] * cfg.down_layers[i]
            if i < len(chans) - 1:
                stage.resample = Downsample(out_ch, cfg)
                skip_channels.append(out_ch)
            self.down_stages.append(stage)
            ch = out_ch

        self.mid_res1 = ResBlock(ch, ch, cfg)
        self.mid_attention = (
            Transformer2D(ch, cfg.mid_transformer_depth, cfg, cfg.mid_self_attention, cfg.mid_cross_attention)
            if cfg.mid_transformer_depth > 0
            else None
        )
        self.mid_res2 = ResBlock(ch, ch, cfg)

        # Up stages run from the lowest resolution; each res block consumes one skip connection.
        self.up_stages = nn.ModuleList()
        for i in reversed(range(len(chans))):
            out_ch = chans[i]
            ins = []
            for _ in range(cfg.up_layers[i]):
                ins.append(ch + skip_channels.pop())
                ch = out_ch
            stage = Stage(
                ins, out_ch, cfg.transformer_depth[i], cfg.self_attention[i], cfg.cross_attention[i], cfg
            )
            if i > 0:
                stage.resample = Upsample(out_ch, cfg)
            self.up_stages.append(stage)

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_unet_config(cls, cfg: UNetConfig) -> SnapGenUNet:
        """A freshly initialised model for ``cfg``."""
        return cls(**{name: getattr(cfg, name) for name in _FIELDS})

    @property
    def unet_config(self) -> UNetConfig:
        """The architecture as a validated, frozen :class:`UNetConfig`."""
        return self._unet_config

    # -- forward --------------------------------------------------------------------------------

    def _call(self, module: nn.Module, *args: torch.Tensor | None) -> Any:
        """Run a block, through activation checkpointing when enabled and training."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            checkpoint: Any = self._gradient_checkpointing_func
            return checkpoint(module, *args)
        return module(*args)

    def _res(self, block: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self._call(block, h, temb)

    def _attn(
        self, block: nn.Module, h: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._call(block, h, context)

    @staticmethod
    def _stages(modules: nn.ModuleList) -> list[Stage]:
        return [m for m in modules if isinstance(m, Stage)]

    def _check_inputs(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        pooled_text: torch.Tensor | None,
    ) -> None:
        """Plain-Python shape checks with actionable messages (skipped while tracing for export)."""
        cfg = self._unet_config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise UsageError(f"sample has shape {tuple(sample.shape)}; expected [B, {cfg.in_channels}, h, w]")
        cfg.check_latent_size(int(sample.shape[-2]), int(sample.shape[-1]))
        if encoder_hidden_states is not None and (
            encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.context_dim
        ):
            raise UsageError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected [B, L, {cfg.context_dim}]"
            )
        if pooled_text is not None and (cfg.pooled_dim == 0 or pooled_text.shape[-1] != cfg.pooled_dim):
            raise UsageError(
                f"pooled_text has shape {tuple(pooled_text.shape)}; this UNet takes pooled_dim={cfg.pooled_dim}"
                + (" (none: pass None)" if cfg.pooled_dim == 0 else "")
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Predict the velocity ``eps - x0``.

        Args:
            sample: noisy latent [B, in_channels, h, w] float32; h, w multiples of 2**(stages-1).
            timestep: [B] float32, t * 1000 (a 0-d tensor or a float is broadcast to B).
            encoder_hidden_states: text tokens [B, L, context_dim], or None: cross-attention is then
                skipped (class-conditional models attend to their class token instead).
            pooled_text: [B, pooled_dim] added to the timestep embedding through an MLP; None adds nothing.
            class_labels: [B] int64 in [0, num_classes]; None or num_classes = the null class.
            return_features: also return a dict of intermediate features (keys below).

        Returns:
            velocity [B, out_channels, h, w], or (velocity, features) with features:
            ``kd_tokens`` [B, N, C_last]: output tokens of the last transformer block at the lowest
            resolution (the mid block; the deepest up stage when the mid block has no transformer),
            N = (h / 2**(stages-1)) * (w / 2**(stages-1)), for feature-level distillation;
            ``down_{i}`` [B, C_i, h_i, w_i]: output of down stage i (before its downsample);
            ``mid`` [B, C_last, h_last, w_last]: output of the mid block;
            ``up_{i}`` [B, C_i, h_i, w_i]: output of the up stage at resolution level i (after its
            res blocks, before its upsample), i = 0 the highest resolution.
        """
        cfg = self._unet_config
        tracing = torch.jit.is_tracing()  # pyright: ignore[reportPrivateImportUsage]
        if not torch.compiler.is_compiling() and not tracing:
            self._check_inputs(sample, encoder_hidden_states, pooled_text)
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([float(timestep)], device=sample.device)
        timestep = timestep.reshape(-1).to(sample.device).expand(batch)

        temb = self.time_mlp(timestep_features(timestep, cfg.time_freq_dim).to(sample.dtype))
        if self.pooled_mlp is not None and pooled_text is not None:
            temb = temb + self.pooled_mlp(pooled_text.to(sample.dtype))
        context = encoder_hidden_states
        if self.class_embedding is not None and self.class_tokens is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), cfg.num_classes, dtype=torch.long, device=sample.device)
            temb = temb + self.class_embedding(class_labels)
            if context is None:
                context = self.class_tokens(class_labels)[:, None, :]
        if context is not None:
            context = context.to(sample.dtype)

        features: dict[str, torch.Tensor] = {}
        kd_tokens: torch.Tensor | None = None
        h = self.conv_in(sample)
        skips = [h]
        for i, stage in enumerate(self._stages(self.down_stages)):
            for j, resnet in enumerate(stage.resnets):
                h = self._res(resnet, h, temb)
                if len(stage.attentions) > 0:
                    h, _ = self._attn(stage.attentions[j], h, context)
                skips.append(h)
            features[f"down_{i}"] = h
            if stage.resample is not None:
                h = stage.resample(h)
                skips.append(h)

        h = self._res(self.mid_res1, h, temb)
        if self.mid_attention is not None:
            h, kd_tokens = self._attn(self.mid_attention, h, context)
        h = self._res(self.mid_res2, h, temb)
        features["mid"] = h

        for k, stage in enumerate(self._stages(self.up_stages)):
            level = len(self.up_stages) - 1 - k
            for j, resnet in enumerate(stage.resnets):
                h = self._res(resnet, torch.cat([h, skips.pop()], dim=1), temb)
                if len(stage.attentions) > 0:
                    h, tokens = self._attn(stage.attentions[j], h, context)
                    if k == 0 and self.mid_attention is None:
                        kd_tokens = tokens  # the last block of the deepest up stage
            features[f"up_{level}"] = h
            if stage.resample is not None:
                h = stage.resample(h)

        velocity = self.conv_out(F.silu(self.norm_out(h)))
        if not return_features:
            return velocity
        if kd_tokens is not None:
            features["kd_tokens"] = kd_tokens
        return velocity, features
