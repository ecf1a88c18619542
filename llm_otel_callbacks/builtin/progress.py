"""StreamingProgress: how far each streamed response has got, as span events and metrics.

Every ``event_every`` chunks (and when the stream ends) the request span gets an
``llm_callback.stream_progress`` event with the chunks and completion tokens so far and the
seconds since the request started; ``llm_callback_streams_active`` gauges the streams in
progress and ``llm_callback_stream_chunks`` the chunks per stream. ``on_progress`` (a callable,
or its dotted path from YAML) is called with the same facts as a dict.

It implements ``on_llm_stream_chunk``, which makes the server parse every chunk and ask the
engine for running token counts (removed again from what the client gets unless it asked for
them): some microseconds per chunk, against the milliseconds a token takes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import Unpack

from .. import Count, RayServeLLMCallback, catalog
from ..serve.hook_kwargs import (
    LLMEndKwargs,
    LLMErrorKwargs,
    LLMStreamChunkKwargs,
    RequestKwargs,
)

logger = logging.getLogger(__name__)

_STREAMS = "progress.streams"  # process_cache key: request -> _Stream


class StreamingProgressOptions(BaseModel):
    """``callback_kwargs`` of :class:`StreamingProgress`."""

    model_config = ConfigDict(defer_build=True, extra="forbid", arbitrary_types_allowed=True)

    event_every: Count = Field(default=16, ge=1)
    """A span event every this many chunks (and one at the end)."""
    on_progress: Any = None
    """Called with a progress dict at each event: a callable or a dotted path to one."""
    on_chunk: Any = None
    """Seed 004: called with each streamed chunk (a callable or a dotted path to one)."""
    on_complete: Any = None
    """Seed 004: called with no arguments when a streamed response ends (ok or error)."""

    @field_validator("on_progress", "on_chunk", "on_complete")
    @classmethod
    def _callable(cls, value: Any) -> Any:
        if value is None or callable(value):
            return value
        if isinstance(value, str) and value.strip():
            from ..config import import_object

            try:
                target = import_object(value.strip())
            except ImportError as exc:
                raise ValueError(str(exc)) from None
            if callable(target):
                return target
        raise ValueError("must be a callable or the dotted path of one")


class _Stream:
    __slots__ = ("chunks", "started", "tokens")

    def __init__(self) -> None:
        self.chunks = 0
        self.tokens: int | None = None
        self.started = time.perf_counter()


class StreamingProgress(RayServeLLMCallback):
    """Per-stream chunk and token progress."""

    kwargs_model = StreamingProgressOptions

    def _streams(self) -> dict[Any, _Stream]:
        streams: dict[Any, _Stream] = self.process_cache.setdefault(_STREAMS, {})
        return streams

    def on_llm_stream_chunk(self, chunk: Any, **kwargs: Unpack[LLMStreamChunkKwargs]) -> None:
        key = _key(kwargs)
        streams = self._streams()
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = _Stream()
            self._active(+1, kwargs)
        stream.chunks += 1
        on_chunk = self.options.on_chunk
        if on_chunk is not None:
            on_chunk(chunk)
        tokens = kwargs.get("completion_tokens")
        if tokens is not None:
            stream.tokens = tokens
        if stream.chunks % self.options.event_every == 0:
            self._report(stream, kwargs, final=False)

    async def on_llm_end(self, response: Any, **kwargs: Unpack[LLMEndKwargs]) -> None:
        self._finish(kwargs, catalog.OUTCOME_OK)

    async def on_llm_error(self, error: Any, **kwargs: Unpack[LLMErrorKwargs]) -> None:
        self._finish(kwargs, catalog.OUTCOME_ERROR)

    def _finish(self, kwargs: LLMEndKwargs, outcome: str) -> None:
        stream = self._streams().pop(_key(kwargs), None)
        if stream is None:
            return
        if kwargs.get("completion_tokens") is not None:
            stream.tokens = kwargs["completion_tokens"]
        self._report(stream, kwargs, final=True)
        self._active(-1, kwargs)
        on_complete = self.options.on_complete
        if on_complete is not None:
            on_complete()
        model = str(kwargs.get("model") or self.model_id)
        self.metric(catalog.STREAM_CHUNKS).record(
            (model, outcome), float(stream.chunks)
        )

    def _report(self, stream: _Stream, kwargs: RequestKwargs, *, final: bool) -> None:
        elapsed = time.perf_counter() - stream.started
        attrs: dict[str, Any] = {
            catalog.A_PROGRESS_CHUNKS: stream.chunks,
            catalog.A_PROGRESS_ELAPSED: elapsed,
        }
        if stream.tokens is not None:
            attrs[catalog.A_PROGRESS_TOKENS] = stream.tokens
        span = trace.get_current_span()  # the request span while a request hook runs
        if span.is_recording():
            span.add_event(catalog.EVENT_STREAM_PROGRESS, attrs)
        callback = self.options.on_progress
        if callback is not None:
            try:
                callback({
                    "request_id": kwargs.get("request_id"),
                    "chunks": stream.chunks,
                    "completion_tokens": stream.tokens,
                    "elapsed_s": elapsed,
                    "done": final,
                })
            except Exception as exc:
                logger.debug("StreamingProgress.on_progress failed: %s", exc)

    def _active(self, delta: float, kwargs: RequestKwargs) -> None:
        model = str(kwargs.get("model") or self.model_id)
        self.metric(catalog.STREAMS_ACTIVE).add((model,), delta)


def _key(kwargs: RequestKwargs) -> Any:
    return kwargs.get("request_id") or id(kwargs.get("request"))
