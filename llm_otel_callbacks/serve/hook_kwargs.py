"""The keyword arguments of the request hooks: one TypedDict per hook, built here and only here.

Type a hook's ``**kwargs`` with them (``typing_extensions.Unpack`` on Python < 3.11)::

    from typing import Unpack
    from llm_otel_callbacks.serve import LLMEndKwargs

    async def on_llm_end(self, response, **kwargs: Unpack[LLMEndKwargs]) -> None:
        tokens = kwargs["completion_tokens"]

Every hook gets :class:`RequestKwargs`; ``on_llm_end`` and ``on_llm_error`` add the request's
outcome (:class:`LLMEndKwargs`, :class:`LLMErrorKwargs`), ``on_llm_stream_chunk`` the chunk's
(:class:`LLMStreamChunkKwargs`). A key added here is added for every caller at once: the
observer (``serve/_requests.py``) calls only the ``*_kwargs`` builders below.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast

from typing_extensions import NotRequired

from .._request_hooks import TokenUsage


class RequestKwargs(TypedDict):
    """What every request hook gets; ``on_llm_start`` gets exactly this."""

    model: str
    """The deployment's model id."""
    request_id: str | None
    """The Serve request id (also the engine's)."""
    trace_id: str | None
    """Trace id of the request span (32 hex digits), or None when nothing traces."""
    stream: bool
    operation: str
    """``chat``, ``completions`` or ``embeddings``."""
    user: str | None
    """The request's ``user`` field."""
    user_id: str | None
    """Same as ``user`` (the seed API's name)."""
    provider: str
    """The engine serving the model (``vllm``; the seed API's ``provider``)."""
    api_key_id: str | None
    """A SHA-256 prefix of the bearer token (never the key), or None without one."""
    request: Any
    """The request object (Ray's ChatCompletionRequest, CompletionRequest, EmbeddingRequest)."""


LLMStartKwargs = RequestKwargs
"""``on_llm_start(prompt, **kwargs)``."""


class LLMEndKwargs(RequestKwargs):
    """``on_llm_end(response, **kwargs)``: token counts are the engine's own ``usage``."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    token_count: int | None
    """Same as ``total_tokens`` (the seed API's name)."""
    duration_ms: float
    """From the request reaching the replica's engine call to now."""
    time_to_first_token_ms: float | None
    """Streams only."""
    chunks: int | None
    """Content chunks sent (streams only)."""
    cost: NotRequired[float]
    """What the request cost, when a :class:`~llm_otel_callbacks.builtin.CostTracker` ran
    before this callback (passed on with :func:`~llm_otel_callbacks.serve.share_kwargs`)."""


class LLMErrorKwargs(LLMEndKwargs):
    """``on_llm_error(error, **kwargs)``."""

    status_code: int | None
    """The HTTP status the client gets, when known."""


class LLMStreamChunkKwargs(RequestKwargs):
    """``on_llm_stream_chunk(chunk, **kwargs)``."""

    index: int
    """0 for the first content chunk."""
    completion_tokens: int | None
    """Completion tokens so far (the engine's running usage)."""
    finish_reason: str | None
    raw: str
    """The chunk's SSE line as the client gets it."""


# --- the one place they are built -----------------------------------------------------------


def start_kwargs(
    *, model: str, request_id: str | None, trace_id: str | None, stream: bool, operation: str,
    user: str | None, api_key_id: str | None, request: Any, provider: str = "",
) -> LLMStartKwargs:
    """Built once per request; every other hook's kwargs extend it."""
    return {
        "model": model,
        "request_id": request_id,
        "trace_id": trace_id,
        "stream": stream,
        "operation": operation,
        "user": user,
        "user_id": user,
        "provider": provider,
        "api_key_id": api_key_id,
        "request": request,
    }


def end_kwargs(
    base: RequestKwargs, *, prompt_tokens: int | None, completion_tokens: int | None,
    duration_ms: float, time_to_first_token_ms: float | None, chunks: int | None,
) -> LLMEndKwargs:
    total = TokenUsage(prompt_tokens, completion_tokens).total_tokens
    return cast(LLMEndKwargs, {  # cast: mypy wants NotRequired keys in a ** item too
        **base,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
        "token_count": total,
        "duration_ms": duration_ms,
        "time_to_first_token_ms": time_to_first_token_ms,
        "chunks": chunks,
    })


def error_kwargs(end: LLMEndKwargs, *, status_code: int | None) -> LLMErrorKwargs:
    return {**end, "status_code": status_code}


def chunk_kwargs(
    base: RequestKwargs, *, index: int, completion_tokens: int | None,
    finish_reason: str | None, raw: str,
) -> LLMStreamChunkKwargs:
    return {
        **base,
        "index": index,
        "completion_tokens": completion_tokens,
        "finish_reason": finish_reason,
        "raw": raw,
    }


__all__ = [
    "LLMEndKwargs",
    "LLMErrorKwargs",
    "LLMStartKwargs",
    "LLMStreamChunkKwargs",
    "RequestKwargs",
    "chunk_kwargs",
    "end_kwargs",
    "error_kwargs",
    "start_kwargs",
]
