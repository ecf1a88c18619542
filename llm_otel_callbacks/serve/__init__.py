"""Ray Serve LLM integration: :class:`ObservedLLMServer` and :class:`ObservedOpenAiIngress`.

Both subclass Ray classes that need vLLM to import, so they load on first use; the request-hook
types (:class:`RequestRejected`, :class:`StreamedResponse`, the hooks' kwargs TypedDicts
:class:`LLMEndKwargs` ...) import without vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._request_hooks import (
    REQUEST_HOOKS,
    RequestRejected,
    ResponseError,
    StreamedResponse,
    TokenUsage,
    share_kwargs,
)
from .hook_kwargs import (
    LLMEndKwargs,
    LLMErrorKwargs,
    LLMStartKwargs,
    LLMStreamChunkKwargs,
    RequestKwargs,
)

if TYPE_CHECKING:
    from .ingress import ObservedOpenAiIngress
    from .server import ObservedLLMServer

__all__ = [
    "REQUEST_HOOKS",
    "LLMEndKwargs",
    "LLMErrorKwargs",
    "LLMStartKwargs",
    "LLMStreamChunkKwargs",
    "ObservedLLMServer",
    "ObservedOpenAiIngress",
    "RequestKwargs",
    "RequestRejected",
    "ResponseError",
    "StreamedResponse",
    "TokenUsage",
    "share_kwargs",
]


def __getattr__(name: str) -> Any:
    # Ray's load_class("llm_otel_callbacks.serve.ObservedLLMServer") lands here.
    if name == "ObservedLLMServer":
        from .server import ObservedLLMServer

        return ObservedLLMServer
    if name == "ObservedOpenAiIngress":
        from .ingress import ObservedOpenAiIngress

        return ObservedOpenAiIngress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
