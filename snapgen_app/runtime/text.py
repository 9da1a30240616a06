"""Run a bundle's text encoder(s) and join their outputs the way the UNet expects.

Each encoder outputs already-projected ``tokens`` [B, L_i, context_dim] and ``pooled`` [B, P_i]
(float32); several encoders are concatenated along tokens (axis 1) and pooled features (axis -1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from snapgen_app.errors import BundleError
from snapgen_app.runtime.sessions import Session
from snapgen_app.runtime.tokenizer import PromptTokenizer

TEXT_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")
TEXT_OUTPUTS: tuple[str, ...] = ("tokens", "pooled")


@dataclass(frozen=True)
class TextEmbedding:
    """``tokens``: float32 [B, sum L_i, context_dim]; ``pooled``: float32 [B, sum P_i];
    ``truncated``: per prompt, whether any tokenizer cut it at its max_length."""

    tokens: np.ndarray
    pooled: np.ndarray
    truncated: tuple[bool, ...]

    def take(self, rows: Sequence[int]) -> TextEmbedding:
        """The embedding rows ``rows`` (repeats allowed), e.g. to expand one prompt to a batch."""
        index = np.asarray(rows, dtype=np.int64)
        return TextEmbedding(self.tokens[index], self.pooled[index], tuple(self.truncated[i] for i in rows))


class TextEncoderStack:
    """Tokenizer + encoder session pairs, run in bundle order."""

    def __init__(self, parts: Sequence[tuple[PromptTokenizer, Session]]) -> None:
        if not parts:
            raise BundleError(
                "the bundle lists no text encoder", hint="re-export the bundle with `snapgen export`"
            )
        self.parts = tuple(parts)

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Embed ``prompts``; see :class:`TextEmbedding` for shapes."""
        tokens, pooled = [], []
        truncated = [False] * len(prompts)
        for tokenizer, session in self.parts:
            session.require_io(TEXT_INPUTS, TEXT_OUTPUTS)
            batch = tokenizer.encode(prompts)
            feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            out = session.run(feeds, TEXT_OUTPUTS)
            tokens.append(_check(out["tokens"], 3, session, "tokens", len(prompts)))
            pooled.append(_check(out["pooled"], 2, session, "pooled", len(prompts)))
            truncated = [a or b for a, b in zip(truncated, batch.truncated, strict=True)]
        _same_width(tokens, self.parts)
        return TextEmbedding(
            tokens=np.concatenate(tokens, axis=1).astype(np.float32, copy=False),
            pooled=np.concatenate(pooled, axis=-1).astype(np.float32, copy=False),
            truncated=tuple(truncated),
        )


def _check(value: np.ndarray, ndim: int, session: Session, name: str, batch: int) -> np.ndarray:
    if value.ndim != ndim or value.shape[0] != batch:
        raise BundleError(
            f"{session.path.name}: output {name!r} has shape {value.shape}, expected {ndim} dims with batch {batch}"
        )
    return value


def _same_width(tokens: Sequence[np.ndarray], parts: Sequence[tuple[PromptTokenizer, Session]]) -> None:
    widths = {t.shape[-1] for t in tokens}
    if len(widths) > 1:
        names = [s.path.name for _, s in parts]
        raise BundleError(
            f"text encoders {names} output different context widths {sorted(widths)}; they must match"
        )
