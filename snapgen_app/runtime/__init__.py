"""The torch-free inference runtime: onnxruntime sessions and providers, tokenizers, text encoders.

Imports onnxruntime, numpy and tokenizers only (never torch); the sampler and the text-to-image
loop live in ``snapgen_app.pipeline``.
"""

from snapgen_app.runtime.providers import available_providers, choose_providers
from snapgen_app.runtime.sessions import RuntimeOptions, Session, SessionCache
from snapgen_app.runtime.text import TextEmbedding, TextEncoderStack
from snapgen_app.runtime.tokenizer import PromptTokenizer

__all__ = [
    "PromptTokenizer",
    "RuntimeOptions",
    "Session",
    "SessionCache",
    "TextEmbedding",
    "TextEncoderStack",
    "available_providers",
    "choose_providers",
]
