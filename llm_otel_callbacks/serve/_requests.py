"""One request's life in the replica: span, GenAI metrics, request hooks, stream observation.

The engine's OpenAI methods (``chat``, ``completions``, ``embeddings``) return async generators:
a streamed response is ``"data: {...}\\n\\n"`` strings ending with ``"data: [DONE]\\n\\n"``, any
other response is one object (the response, or an ``ErrorResponse``).
:meth:`RequestObserver.observe` wraps that generator in exactly one generator layer, before Ray's
stream batching, so the time to the first token is the engine's, not the batch interval's.

Token counts come from the engine's own ``usage``: for a stream the observer asks the engine
for the final usage chunk (``stream_options.include_usage``) and drops that chunk again when the
client did not ask for it, so the client sees what it would have seen. Chunks are parsed only
when some target implements ``on_llm_stream_chunk``; then the engine is also asked for running
usage on each chunk (token progress), which is likewise removed when the client did not ask.

Nothing here imports Ray or vLLM (the engine module hands in the few vLLM types needed), so the
hot path can be measured and tested alone. The stream format is read in :mod:`._sse`; the
per-request record and the metrics and span endings it produces are in :mod:`._request_record`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import NoOpTracer, SpanKind, get_current_span, set_span_in_context

from .. import catalog
from .._observe import error_text
from .._request_hooks import (
    ON_CHUNK,
    ON_END,
    ON_ERROR,
    ON_START,
    BoundHook,
    ChunkStats,
    RequestHooks,
    RequestRejected,
    ResponseError,
    StreamedResponse,
    TokenUsage,
)
from ..composite import ChildHookError
from ..telemetry.providers import Telemetry
from . import _sse
from ._request_record import (
    Labels,
    Record,
    RequestTelemetry,
    api_key_id,
    prompt_of,
    response_error,
    sampling_attributes,
)
from ._sse import CONTENT, DONE, DONE_ITEM, ERROR, USAGE, kind_of, sse_error
from ._trace_headers import with_trace_headers
from .hook_kwargs import (
    LLMEndKwargs,
    RequestKwargs,
    chunk_kwargs,
    end_kwargs,
    error_kwargs,
    start_kwargs,
)

logger = logging.getLogger(__name__)

#: Extra field of an ErrorResponse's ``error`` holding the exact body for the client (read by
#: ObservedOpenAiIngress; Ray's own ingress uses only message, type and code).
RESPONSE_FIELD = "llm_otel_response"

ErrorResponseFactory = Callable[[int, str, str, dict[str, Any]], Any]
"""(status_code, message, error_type, extra fields) -> the engine's ErrorResponse object."""

_OPERATIONS = {
    "chat": catalog.OPERATION_CHAT,
    "completions": catalog.OPERATION_TEXT_COMPLETION,
    "embeddings": catalog.OPERATION_EMBEDDINGS,
}


class RequestObserver:
    """Spans, GenAI metrics and request hooks for one replica's requests."""

    def __init__(
        self,
        *,
        model: str,
        provider: str,
        tel: Telemetry,
        hooks: RequestHooks,
        error_response: ErrorResponseFactory,
        error_types: tuple[type, ...],
        record_exception_messages: bool = True,
        client_error_messages: bool = False,
        trace_into_engine: bool = False,
    ) -> None:
        self.model = model
        #: vLLM traces requests too: hand it our request span as the parent (_trace_headers).
        self.trace_into_engine = trace_into_engine
        self.provider = provider
        self.hooks = hooks
        self._tracer = tel.tracer
        self._error_response = error_response
        self._error_types = error_types
        self._record_message = record_exception_messages
        self._client_messages = client_error_messages
        self._telemetry = RequestTelemetry(tel, record_exception_messages)
        self._rejected = tel.recorder(catalog.REQUESTS_REJECTED)
        self._labels = {op: Labels(name, provider, model) for op, name in _OPERATIONS.items()}
        self._span_names = {op: f"{name} {model}" for op, name in _OPERATIONS.items()}
        # Per replica, not per request: what every span of an operation carries. A tracer
        # that records nothing (no exporter configured) gets no attributes built at all.
        self._tracing = not isinstance(tel.tracer, NoOpTracer)
        self._base_attrs: dict[str, dict[str, Any]] = {
            op: {catalog.A_GENAI_OPERATION: name, catalog.A_GENAI_PROVIDER: provider,
                 catalog.A_MODEL: model}
            for op, name in _OPERATIONS.items()
        }
        self._background: set[asyncio.Task[Any]] = set()
        self._usage_options = _sse.UsageOptions()

    # --- entry --------------------------------------------------------------------------------

    def observe(
        self, op: str, method: Callable[..., AsyncIterator[Any]], request: Any, raw: Any
    ) -> AsyncGenerator[Any, None]:
        """The engine method's generator, observed (``op``: chat, completions, embeddings)."""
        try:
            rec = self._begin(op, request, raw)
        except Exception as exc:  # the telemetry path never fails a request
            logger.warning("llm_otel_callbacks: request not observed: %s", exc)
            return method(request, raw)  # type: ignore[return-value]
        if self.trace_into_engine:
            raw = with_trace_headers(raw, rec.span)
        if rec.stream:
            return self._observe_stream(rec, method, request, raw)
        return self._observe_once(rec, method, request, raw)

    def _begin(self, op: str, request: Any, raw: Any) -> Record:
        rec = Record(op, self._labels[op], bool(getattr(request, "stream", False)))
        request_id = getattr(request, "request_id", None)
        parent = otel_context.get_current()  # Serve's request span, when Serve traces
        hooks = self.hooks.any
        if self._tracing:
            attrs = self._base_attrs[op].copy()
            attrs[catalog.A_STREAM] = rec.stream
            if request_id:
                attrs[catalog.A_REQUEST_ID] = str(request_id)
            sampling_attributes(request, attrs)
            span = self._tracer.start_span(
                self._span_names[op], context=parent, kind=SpanKind.SERVER, attributes=attrs
            )
            rec.span = span
            if span.is_recording():
                rec.exemplar = span.get_span_context()
            if hooks:  # the hooks run with the request span current
                rec.ctx = set_span_in_context(span, parent)
        if not hooks:
            return rec
        span_ctx = rec.span.get_span_context()
        if not span_ctx.is_valid:  # no tracer of ours: the hooks still get Serve's trace
            span_ctx = get_current_span(parent).get_span_context()
        rec.trace_id = format(span_ctx.trace_id, "032x") if span_ctx.is_valid else None
        rec.kwargs = start_kwargs(
            model=self.model, request_id=request_id, trace_id=rec.trace_id, stream=rec.stream,
            operation=op, user=getattr(request, "user", None), api_key_id=api_key_id(raw),
            request=request, provider=self.provider,
        )
        return rec

    # --- hooks --------------------------------------------------------------------------------

    async def _hooks(
        self, rec: Record, hook: str, bound: tuple[BoundHook, ...], arg: Any,
        kwargs: RequestKwargs, chunk_stats: ChunkStats | None = None,
    ) -> None:
        token = otel_context.attach(rec.ctx or otel_context.get_current())  # span is current
        try:
            await self.hooks.run(hook, bound, arg, kwargs, rec.span, chunk_stats=chunk_stats)
        finally:
            otel_context.detach(token)

    async def _start(self, rec: Record, request: Any) -> Any:
        """Run ``on_llm_start``; returns an error response to send instead, or None."""
        assert rec.kwargs is not None
        try:
            await self._hooks(rec, ON_START, self.hooks.start, prompt_of(rec.op, request),
                              rec.kwargs)
        except RequestRejected as rejection:
            return await self._reject(rec, rejection)
        except ChildHookError as exc:
            await self._fail(rec, exc, "hook_error")
            return self._hook_failure(exc)
        return None

    def _client_message(self, exc: ChildHookError) -> str:
        """What a client learns of a failed hook: the callback, the hook and the error's type.
        The error's message (a billing URL, a key...) only with ``client_error_messages``."""
        return str(exc) if self._client_messages else exc.summary

    def _hook_failure(self, exc: ChildHookError) -> Any:
        """The error response of a request a raise-policy hook failed."""
        message = self._client_message(exc)
        body = {"error": {"message": message, "type": "callback_error", "param": None,
                          "code": 500}}
        return self._error_response(500, message, "InternalServerError", {RESPONSE_FIELD: body})

    async def _reject(self, rec: Record, rejection: RequestRejected) -> Any:
        by = rejection.rejected_by or ""
        try:
            self._rejected.add((self.model, by, rejection.reason))
            span = rec.span
            if span.is_recording():
                span.set_attribute(catalog.A_REJECTED_BY, by)
                span.set_attribute(catalog.A_REJECT_REASON, rejection.reason)
                if rejection.retry_after_s is not None:
                    span.set_attribute(catalog.A_RETRY_AFTER, rejection.retry_after_s)
        except Exception as exc:
            logger.debug("rejection not recorded: %s", exc)
        await self._fail(rec, rejection, type(rejection).__name__, status=rejection.status_code)
        extra: dict[str, Any] = {RESPONSE_FIELD: rejection.body()}
        if rejection.retry_after_s is not None:
            extra["retry_after_s"] = rejection.retry_after_s
        message = rejection.message
        return self._error_response(rejection.status_code, message, rejection.reason, extra)

    # --- non-streamed responses ------------------------------------------------------------

    async def _observe_once(
        self, rec: Record, method: Callable[..., AsyncIterator[Any]], request: Any, raw: Any
    ) -> AsyncGenerator[Any, None]:
        if self.hooks.start:
            refusal = await self._start(rec, request)
            if refusal is not None:
                yield refusal
                return
        try:
            async for item in method(request, raw):
                if rec.done:
                    yield item
                    continue
                if isinstance(item, self._error_types):
                    error = response_error(item)
                    await self._fail(rec, error, error.error_type, status=error.status_code)
                    yield item
                    continue
                replacement = await self._end_once(rec, item)
                yield item if replacement is None else replacement
        except (GeneratorExit, asyncio.CancelledError):
            self._cancelled(rec)
            raise
        except Exception as exc:
            await self._fail(rec, exc, type(exc).__name__)
            raise
        if not rec.done:  # the engine returned nothing
            await self._fail(rec, ResponseError("empty response", status_code=500,
                                                error_type="EmptyResponse"), "EmptyResponse")

    async def _end_once(self, rec: Record, response: Any) -> Any:
        usage = getattr(response, "usage", None)
        rec.prompt_tokens = getattr(usage, "prompt_tokens", None)
        completion = getattr(usage, "completion_tokens", None)
        rec.completion_tokens = completion if rec.op != "embeddings" else None
        finish = [
            str(c.finish_reason) for c in (getattr(response, "choices", None) or [])
            if getattr(c, "finish_reason", None) is not None
        ]
        self._telemetry.response_attributes(
            rec, getattr(response, "id", None), getattr(response, "model", None), finish
        )
        if self.hooks.end:
            try:
                await self._hooks(rec, ON_END, self.hooks.end, response, self._end_kwargs(rec))
            except ChildHookError as exc:
                await self._fail(rec, exc, "hook_error")
                return self._hook_failure(exc)
        self._telemetry.succeeded(rec)
        return None

    # --- streamed responses --------------------------------------------------------------------

    async def _observe_stream(
        self, rec: Record, method: Callable[..., AsyncIterator[Any]], request: Any, raw: Any
    ) -> AsyncGenerator[Any, None]:
        hooks = self.hooks
        if hooks.start:
            refusal = await self._start(rec, request)
            if refusal is not None:
                yield refusal
                return
        chunk_hooks = bool(hooks.chunk)
        drop_usage, strip_usage = self._usage_options.ask(request, continuous=chunk_hooks)
        if chunk_hooks:
            rec.text = []
        gen = method(request, raw)
        n = 0  # content chunks so far (locals: this loop runs once per chunk)
        last: str | None = None
        first: float | None = None
        try:
            async for item in gen:
                if item.__class__ is not str:  # an error (or a response) instead of a stream
                    if not rec.done and isinstance(item, self._error_types):
                        error = response_error(item)
                        await self._fail(rec, error, error.error_type, status=error.status_code)
                    yield item
                    continue
                # The usual chunk: vLLM writes "id" first and "choices" last. Anything else
                # (the usage chunk, an error, [DONE], another layout) takes the careful path.
                if item[8:9] == "i" and item[-4] == "]":
                    kind = CONTENT
                else:
                    kind = kind_of(item)
                    if kind == USAGE:
                        rec.tokens_end = time.perf_counter()
                        usage = _sse.read_usage(item)
                        if usage is not None:
                            rec.prompt_tokens, rec.completion_tokens = usage
                        if drop_usage:
                            continue
                    elif kind == ERROR:
                        rec.error = _sse.stream_error(item)
                    elif kind == DONE and not rec.done:
                        rec.chunks, rec.last = n, last
                        failure = await self._end_stream(rec)
                        if failure is not None:
                            yield failure
                if kind == CONTENT:
                    if first is None:
                        first = rec.first = time.perf_counter()
                    n += 1
                    last = item
                    if chunk_hooks:
                        rec.chunks = n
                        item = await self._chunk(rec, item, strip_usage)
                yield item
        except (GeneratorExit, asyncio.CancelledError):
            rec.chunks, rec.last = n, last
            self._cancelled(rec)
            raise
        except ChildHookError as exc:  # a stream-chunk hook with the raise policy
            rec.chunks, rec.last = n, last
            await self._fail(rec, exc, "hook_error")
            yield sse_error(500, self._client_message(exc), "InternalServerError")
            yield DONE_ITEM
        except Exception as exc:
            rec.chunks, rec.last = n, last
            await self._fail(rec, exc, type(exc).__name__)
            raise
        finally:
            await _close(gen)  # stops the engine's work when we stop early
        if not rec.done:  # the engine ended without [DONE]
            rec.chunks, rec.last = n, last
            await self._end_stream(rec)

    async def _chunk(self, rec: Record, item: str, strip_usage: bool) -> str:
        """Parse one chunk for the stream-chunk hooks; returns the chunk to send."""
        text, finish, usage, item = _sse.parse_chunk(item, strip_usage)
        if usage is not None:
            rec.chunk_tokens = usage.get("completion_tokens")
        if text and rec.text is not None:
            rec.text.append(text)
        assert rec.kwargs is not None
        kwargs = chunk_kwargs(rec.kwargs, index=rec.chunks - 1,
                              completion_tokens=rec.chunk_tokens, finish_reason=finish, raw=item)
        stats = rec.chunk_calls
        if stats is None:
            stats = rec.chunk_calls = ChunkStats(len(self.hooks.chunk))
        await self._hooks(rec, ON_CHUNK, self.hooks.chunk, text or "", kwargs, chunk_stats=stats)
        return item

    async def _end_stream(self, rec: Record) -> str | None:
        """Finish a stream at ``[DONE]``; returns an error chunk to send first, or None."""
        if rec.tokens_end is None:
            rec.tokens_end = time.perf_counter()
        self._count_chunk_calls(rec)
        if rec.error is not None:
            error = rec.error
            await self._fail(rec, error, getattr(error, "error_type", type(error).__name__))
            return None
        response_id, response_model, finish = _sse.last_chunk_facts(rec.last)
        self._telemetry.response_attributes(rec, response_id, response_model, finish)
        if self.hooks.end:
            streamed = StreamedResponse(
                id=response_id,
                model=response_model or self.model,
                usage=TokenUsage(rec.prompt_tokens, rec.completion_tokens),
                chunks=rec.chunks,
                finish_reasons=finish,
                text="".join(rec.text) if rec.text is not None else None,
            )
            try:
                await self._hooks(rec, ON_END, self.hooks.end, streamed, self._end_kwargs(rec))
            except ChildHookError as exc:
                await self._fail(rec, exc, "hook_error")
                return sse_error(500, self._client_message(exc), "InternalServerError")
        self._telemetry.succeeded(rec)
        return None

    def _count_chunk_calls(self, rec: Record) -> None:
        """Successful stream-chunk calls are recorded once per stream, not per chunk."""
        stats = rec.chunk_calls
        if stats is not None:
            rec.chunk_calls = None
            self.hooks.flush_chunks(self.hooks.chunk, stats, rec.span)

    # --- endings -------------------------------------------------------------------------------

    def _end_kwargs(self, rec: Record) -> LLMEndKwargs:
        assert rec.kwargs is not None
        now = time.perf_counter()
        return end_kwargs(
            rec.kwargs,
            prompt_tokens=rec.prompt_tokens,
            completion_tokens=rec.completion_tokens,
            duration_ms=(now - rec.t0) * 1000.0,
            time_to_first_token_ms=(
                (rec.first - rec.t0) * 1000.0 if rec.first is not None else None
            ),
            chunks=rec.chunks if rec.stream else None,
        )

    async def _fail(
        self, rec: Record, error: BaseException, error_type: str, status: int | None = None
    ) -> None:
        """End the request with an error: ``on_llm_error``, span status, duration metric."""
        if rec.done:
            return
        rec.done = True
        self._count_chunk_calls(rec)
        if self.hooks.error and rec.kwargs is not None:
            kwargs = error_kwargs(self._end_kwargs(rec), status_code=status)
            try:
                await self._hooks(rec, ON_ERROR, self.hooks.error, error, kwargs)
            except ChildHookError as exc:  # the request fails anyway; keep the first error
                logger.debug("on_llm_error failed too: %s", error_text(exc, self._record_message))
        self._telemetry.end_error(rec, error, error_type, status)

    def _cancelled(self, rec: Record) -> None:
        """The client went away (the stream was closed or the task cancelled)."""
        if rec.done:
            return
        error = asyncio.CancelledError("the client closed the request")
        if self.hooks.error and rec.kwargs is not None:
            # Nothing may be awaited here: on_llm_error runs on its own.
            try:
                task = asyncio.get_running_loop().create_task(
                    self._fail(rec, error, catalog.ERROR_CANCELLED)
                )
            except RuntimeError:  # no loop (finalized late): record without the hooks
                pass
            else:
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return
        rec.done = True
        self._count_chunk_calls(rec)
        self._telemetry.end_error(rec, error, catalog.ERROR_CANCELLED, None)


# --- helpers ---------------------------------------------------------------------------------


async def _close(gen: Any) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception as exc:
            logger.debug("engine stream did not close cleanly: %s", exc)
