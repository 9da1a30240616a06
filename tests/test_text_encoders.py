"""Frozen text encoders (MiniLM offline, tiny random CLIP and Gemma) and the TextConditioner."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it: no network, ever

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model

from snapgen_app.config import TextConditionerConfig, TextEncoderConfig
from snapgen_app.errors import ConfigError
from snapgen_app.model.text_encoders import (
    FrozenTextEncoder,
    TextConditioner,
    export_tokenizer_json,
    load_text_encoder,
    minilm_model_dir,
)

PROMPTS = ["a maple leaf on a blue background", "a fire to the left of a zebra", "", "Ünïcode & PUNCT!!"]
LONG_PROMPT = " ".join(["zebra"] * 80)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread avoids oversubscription on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    return load_text_encoder(TextEncoderConfig(kind="minilm", max_length=32))


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random CLIP text model and a tiny random Gemma-2 saved like hub folders.

    Both reuse MiniLM's (BERT) tokenizer: the wrappers only need a fast tokenizer whose special
    tokens the model config names. Gemma's copy pads on the left, as Gemma tokenizers do.
    """
    root = tmp_path_factory.mktemp("text_models")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    torch.manual_seed(0)
    clip = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            projection_dim=16,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    gemma = Gemma2Model(
        Gemma2Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    gemma.save_pretrained(root / "gemma")
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(root / "gemma")
    return {"clip": root / "clip", "gemma": root / "gemma"}


def _two_encoder_config(
    sources: dict[str, Path],
    *,
    pooled_projection_dim: int = 0,
    dropout: tuple[float, float] = (0.0, 0.0),
    drop_mode: Literal["zeros", "empty_prompt"] = "zeros",
) -> TextConditionerConfig:
    clip = TextEncoderConfig(
        kind="clip",
        source=str(sources["clip"]),
        max_length=16,
        hidden_size=32,
        pooled_size=16,
        pooled="text_embeds",
        token_layer="penultimate",
    )
    gemma = TextEncoderConfig(
        kind="gemma",
        source=str(sources["gemma"]),
        max_length=12,
        hidden_size=32,
        pooled_size=32,
        pooled="mean",
    )
    return TextConditionerConfig(
        encoders=(clip, gemma),
        context_dim=24,
        pooled_projection_dim=pooled_projection_dim,
        dropout=dropout,
        drop_mode=drop_mode,
    )


def test_minilm_loads_offline_and_matches_sentence_transformers(
    minilm: FrozenTextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokens, pooled = minilm.encode(PROMPTS)
    assert tokens.shape == (4, 32, 384) and tokens.dtype == torch.float32
    assert pooled.shape == (4, 384)
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(4))
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(minilm_model_dir()), device="cpu")
    expected = reference.encode(PROMPTS, convert_to_tensor=True)
    assert (pooled - expected).abs().max().item() < 1e-5


def test_tokenize_pads_and_truncates_to_max_length(minilm: FrozenTextEncoder) -> None:
    ids, mask = minilm.tokenize(["a cat", LONG_PROMPT])
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == mask.dtype == torch.int64
    assert mask[0].sum().item() == 4  # [CLS] a cat [SEP]
    assert mask[1].sum().item() == 32
    assert ids[1, -1].item() == minilm.tokenizer.sep_token_id  # truncation keeps the closing token


@pytest.mark.parametrize("which", ["minilm", "gemma"])
def test_exported_tokenizer_json_gives_the_same_ids(
    which: str, minilm: FrozenTextEncoder, tiny_sources: dict[str, Path], tmp_path: Path
) -> None:
    encoder = minilm
    if which == "gemma":
        encoder = load_text_encoder(
            TextEncoderConfig(
                kind="gemma",
                source=str(tiny_sources["gemma"]),
                max_length=12,
                hidden_size=32,
                pooled_size=32,
                pooled="mean",
            )
        )
    path = export_tokenizer_json(encoder, tmp_path / "tokenizer.json")
    runtime_tokenizer = Tokenizer.from_file(str(path))
    prompts = [*PROMPTS, LONG_PROMPT]
    encodings = runtime_tokenizer.encode_batch(prompts)
    ids, mask = encoder.tokenize(prompts)
    assert torch.equal(ids, torch.tensor([e.ids for e in encodings]))
    assert torch.equal(mask, torch.tensor([e.attention_mask for e in encodings]))
    if which == "gemma":
        assert mask[0, 0].item() == 0 and mask[0, -1].item() == 1  # left padding kept


def test_clip_and_gemma_concatenate_through_the_conditioner(tiny_sources: dict[str, Path]) -> None:
    conditioner = TextConditioner(_two_encoder_config(tiny_sources, pooled_projection_dim=8)).eval()
    tokens, pooled = conditioner.encode(PROMPTS)
    assert tokens.shape == (4, 16 + 12, 24)
    assert pooled.shape == (4, 2 * 8) == (4, conditioner.config.pooled_dim)
    # Each segment is that encoder's own projected output.
    for index, (start, stop) in enumerate([(0, 16), (16, 28)]):
        own_tokens, own_pooled = conditioner.export_module(index)(
            *conditioner.encoder(index).tokenize(PROMPTS)
        )
        torch.testing.assert_close(tokens[:, start:stop], own_tokens)
        torch.testing.assert_close(pooled[:, 8 * index : 8 * (index + 1)], own_pooled)
    # Without a pooled projection the raw pooled vectors are concatenated (16 CLIP + 32 Gemma).
    raw = TextConditioner(
        _two_encoder_config(tiny_sources), encoders=[conditioner.encoder(0), conditioner.encoder(1)]
    ).eval()
    clip_pooled = conditioner.encoder(0).encode(PROMPTS)[1]
    assert raw.encode(PROMPTS)[1].shape == (4, 48)
    torch.testing.assert_close(raw.encode(PROMPTS)[1][:, :16], clip_pooled)


def test_dropout_drops_each_encoder_independently(tiny_sources: dict[str, Path]) -> None:
    conditioner = TextConditioner(_two_encoder_config(tiny_sources, dropout=(0.5, 0.5)))
    prompts = [f"prompt number {i}" for i in range(16)]
    reference_tokens, reference_pooled = conditioner.eval().encode(prompts)
    conditioner.train()
    tokens, pooled = conditioner(prompts, generator=torch.Generator().manual_seed(7))
    dropped = conditioner.sample_drop_mask(16, torch.Generator().manual_seed(7))
    assert (dropped[:, 0] & ~dropped[:, 1]).any() and (~dropped[:, 0] & dropped[:, 1]).any()
    token_slices, pooled_slices = [slice(0, 16), slice(16, 28)], [slice(0, 16), slice(16, 48)]
    for row in range(16):
        for index in range(2):
            got_t, got_p = tokens[row, token_slices[index]], pooled[row, pooled_slices[index]]
            if dropped[row, index]:
                assert not got_t.any() and not got_p.any()
            else:
                torch.testing.assert_close(got_t, reference_tokens[row, token_slices[index]])
                torch.testing.assert_close(got_p, reference_pooled[row, pooled_slices[index]])
    null_tokens, null_pooled = conditioner.unconditional(2)
    assert null_tokens.shape == (2, 28, 24) and not null_tokens.any() and not null_pooled.any()


def test_empty_prompt_drop_mode_uses_the_empty_string(tiny_sources: dict[str, Path]) -> None:
    config = _two_encoder_config(tiny_sources, dropout=(1.0, 0.0), drop_mode="empty_prompt")
    conditioner = TextConditioner(config).train()
    tokens, pooled = conditioner(["a red apple", "a blue car"], generator=torch.Generator().manual_seed(0))
    empty_tokens, empty_pooled = conditioner.eval().encode(["", ""])
    torch.testing.assert_close(tokens[:, :16], empty_tokens[:, :16])
    torch.testing.assert_close(pooled[:, :16], empty_pooled[:, :16])
    assert not torch.allclose(tokens[:, 16:], empty_tokens[:, 16:])  # encoder 1 was kept
    torch.testing.assert_close(conditioner.unconditional(2)[0], empty_tokens)


def test_only_projections_train(minilm: FrozenTextEncoder) -> None:
    conditioner = TextConditioner(
        TextConditionerConfig(context_dim=64, pooled_projection_dim=32), encoders=[minilm]
    )
    conditioner.train()
    assert not minilm.model.training  # frozen encoder keeps dropout off
    tokens, pooled = conditioner(["a cat"], generator=torch.Generator().manual_seed(1))
    (tokens.square().mean() + pooled.square().mean()).backward()
    assert all(p.grad is not None for p in conditioner.projection.parameters())
    assert all(not p.requires_grad and p.grad is None for p in minilm.parameters())
    trainable = {n for n, p in conditioner.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projection.") for n in trainable)


def test_projection_save_load_round_trip_is_bit_exact(minilm: FrozenTextEncoder, tmp_path: Path) -> None:
    config = TextConditionerConfig(context_dim=64, pooled_projection_dim=32, dropout=(0.2,))
    torch.manual_seed(3)
    conditioner = TextConditioner(config, encoders=[minilm]).eval()
    conditioner.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = TextConditioner.from_pretrained(tmp_path, encoders=[minilm]).eval()
    assert loaded.config == config
    original, restored = conditioner.projection.state_dict(), loaded.projection.state_dict()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    first, second = conditioner.encode(PROMPTS[:2]), loaded.encode(PROMPTS[:2])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_configs_and_sizes_are_checked(minilm: FrozenTextEncoder, tiny_sources: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"encoders\[0\]"):
        TextConditioner(
            TextConditionerConfig(encoders=(TextEncoderConfig(max_length=16),)), encoders=[minilm]
        )
    with pytest.raises(ConfigError, match="one probability per encoder"):
        TextConditionerConfig(dropout=(0.1, 0.1))
    with pytest.raises(ConfigError, match="not defined for minilm"):
        TextEncoderConfig(kind="minilm", pooled="text_embeds")
    with pytest.raises(ConfigError, match="source"):
        TextEncoderConfig(kind="clip", source="")
    with pytest.raises(ConfigError, match="set hidden_size to 32"):
        load_text_encoder(
            TextEncoderConfig(
                kind="gemma", source=str(tiny_sources["gemma"]), hidden_size=64, pooled_size=64, pooled="mean"
            )
        )
    round_trip = TextConditionerConfig.from_dict(_two_encoder_config(tiny_sources).to_dict())
    assert round_trip == _two_encoder_config(tiny_sources)
