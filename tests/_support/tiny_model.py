"""The tiny local model for tests: the package's own builder (the demo uses it too)."""

from __future__ import annotations

from llm_otel_callbacks.demo.tiny_model import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    SEED,
    VOCAB_SIZE,
    is_complete,
    make_tiny_model,
)

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "EOS",
    "PAD",
    "SEED",
    "VOCAB_SIZE",
    "is_complete",
    "make_tiny_model",
]

if __name__ == "__main__":  # python -m tests._support.tiny_model /some/dir
    import sys
    from pathlib import Path

    print(make_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")))
