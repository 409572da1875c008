"""The tiny Llama builder, kept importable from here for the tests; it lives in the devenv package
(finetune_devenv.tiny_model) so that `make demo` uses the same model without importing tests."""

from finetune_devenv.tiny_model import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tiny_model,
    build_tokenizer,
)

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "VOCAB_SIZE", "build_tiny_model", "build_tokenizer"]
