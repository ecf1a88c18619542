"""The engine seen through the observer: the OpenAI methods are observed, the rest delegated.

``LLMServer`` calls ``self.engine.chat(request, raw_request_info)`` (and ``completions``,
``embeddings``) and batches what the returned generator yields; anything else it asks of the
engine (health, LoRA, sleep, the ASGI app) goes straight to the real engine.
"""

from __future__ import annotations

from typing import Any

from .._ray import error_response_classes
from ._requests import RequestObserver


class ObservedEngine:
    """Wraps a started engine (``VLLMEngine``); not pickled, lives in the replica."""

    def __init__(self, engine: Any, observer: RequestObserver) -> None:
        self._engine = engine
        self._observer = observer

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks: everything but the three methods below.
        return getattr(self.__dict__["_engine"], name)

    @property
    def wrapped(self) -> Any:
        """The real engine."""
        return self._engine

    def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        return self._observer.observe("chat", self._engine.chat, request, raw_request_info)

    def completions(self, request: Any, raw_request_info: Any = None) -> Any:
        return self._observer.observe(
            "completions", self._engine.completions, request, raw_request_info
        )

    def embeddings(self, request: Any, raw_request_info: Any = None) -> Any:
        return self._observer.observe(
            "embeddings", self._engine.embeddings, request, raw_request_info
        )


def make_error_response(
    status_code: int, message: str, error_type: str, extra: dict[str, Any]
) -> Any:
    """An ``ErrorResponse`` as the engine yields one; ``extra`` rides along as extra fields
    (the OpenAI ingress reads ``code`` for the HTTP status; ours also the rejection body)."""
    error_response, error_info = error_response_classes()
    return error_response(
        error=error_info(message=message, type=error_type, code=status_code, **extra)
    )


def engine_error_types() -> tuple[type, ...]:
    """Classes of the error responses an engine yields (Ray's and vLLM's)."""
    error_response, _ = error_response_classes()
    types: list[type] = [error_response]
    for base in error_response.__mro__[1:]:
        if base.__name__ == "ErrorResponse":
            types.append(base)
    return tuple(types)


def provider_of(engine: Any) -> str:
    """``gen_ai.provider.name``: the engine serving the model."""
    module = type(engine).__module__.lower()
    for name in ("vllm", "sglang"):
        if name in module:
            return name
    return type(engine).__name__.lower()
