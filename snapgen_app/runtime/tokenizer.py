"""Prompt tokenization with the ``tokenizers`` library (a bundle's tokenizer.json), no transformers.

Prompts are padded to the bundle's ``max_length`` (or to the longest prompt of the batch when
``pad_to_max_length`` is false) and truncated at it; a truncated prompt is logged and reported back
so the result can warn the user.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from snapgen_app.errors import BundleError

log = logging.getLogger(__name__)

_PAD_TOKEN_CANDIDATES: tuple[str, ...] = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")


@dataclass(frozen=True)
class TokenizedPrompts:
    """``input_ids`` and ``attention_mask``: int64 [B, L]; ``truncated``: one flag per prompt."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: tuple[bool, ...]


class PromptTokenizer:
    """Fixed-length tokenizer for one text encoder."""

    def __init__(
        self, tokenizer: Tokenizer, max_length: int, pad_to_max_length: bool = True, name: str = ""
    ) -> None:
        if max_length < 1:
            raise BundleError(f"{name or 'tokenizer'}: max_length must be >= 1, got {max_length}")
        self.name = name
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self._tokenizer = tokenizer
        pad_id, pad_token = _pad_token(tokenizer)
        # The directions the tokenizer was saved with (Gemma pads on the left): tokenizers' own
        # defaults (right) would move the tokens away from where the text encoder expects them.
        padding_side = (tokenizer.padding or {}).get("direction", "right")
        truncation_side = (tokenizer.truncation or {}).get("direction", "right")
        tokenizer.enable_truncation(max_length=max_length, direction=truncation_side)
        if pad_to_max_length:
            tokenizer.enable_padding(
                length=max_length, pad_id=pad_id, pad_token=pad_token, direction=padding_side
            )
        else:
            tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, direction=padding_side)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int, pad_to_max_length: bool = True) -> PromptTokenizer:
        """Load a tokenizer.json; raises BundleError naming the file when it is missing or invalid."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"tokenizer file missing: {path}", hint="re-download or re-export the model")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception with a serde message
            raise BundleError(
                f"{path.name} is not a valid tokenizer.json: {str(exc).splitlines()[0][:200]}"
            ) from exc
        return cls(tokenizer, max_length, pad_to_max_length, name=path.name)

    def encode(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """Token ids and attention masks for ``prompts`` (int64 [B, L], L = max_length when padded)."""
        encodings = self._tokenizer.encode_batch(list(prompts))
        truncated = tuple(len(e.overflowing) > 0 for e in encodings)
        for prompt, cut in zip(prompts, truncated, strict=True):
            if cut:
                log.warning(
                    "prompt longer than %d tokens was truncated (%s): %.60r",
                    self.max_length,
                    self.name,
                    prompt,
                )
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        return TokenizedPrompts(input_ids=ids, attention_mask=mask, truncated=truncated)


def _pad_token(tokenizer: Tokenizer) -> tuple[int, str]:
    """The tokenizer's own padding token if configured, else a conventional one, else id 0."""
    padding = tokenizer.padding
    if padding and padding.get("pad_token") is not None:
        return int(padding["pad_id"]), str(padding["pad_token"])
    for token in _PAD_TOKEN_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id, token
    return 0, tokenizer.id_to_token(0) or "[PAD]"
