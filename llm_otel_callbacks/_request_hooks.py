"""Request hooks: who implements them, and calling them with each child's policy.

The hook names and arguments are the seed request-callback API's::

    async def on_llm_start(self, prompt, **kwargs): ...
    async def on_llm_end(self, response, **kwargs): ...
    async def on_llm_error(self, error, **kwargs): ...
    async def on_llm_stream_chunk(self, chunk, **kwargs): ...

They are looked up once per replica on ``callback.hook_targets()`` (a composite's children, or
the callback itself), so a hook no target implements is an empty tuple: no call, no span, no
metric, for every request and every chunk. Sync hooks are allowed too.

Policies, per target, as in the composite: a hook that raises under ``raise_error_on_callback``
fails the request with :class:`~llm_otel_callbacks.ChildHookError` naming the target and the
hook; under the log policy the error is an event on the request span and an
``llm_callback_hook_calls_total{outcome="error"}`` point, and the request goes on. Raising
:class:`RequestRejected` (a :class:`~llm_otel_callbacks.builtin.RateLimiter` does) from
``on_llm_start`` refuses the request with its HTTP status under either policy.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span

from . import catalog
from ._callers import BoundedPool, call_async, timeout_for
from ._observe import error_text, outcome_of
from .adapters import REQUEST_HOOKS as REQUEST_HOOKS
from .base import HookTarget
from .composite import ChildHookError
from .telemetry.metrics import NULL_RECORDER, Recorder

logger = logging.getLogger(__name__)

ON_START, ON_END, ON_ERROR, ON_CHUNK = REQUEST_HOOKS

#: While a request hook runs: the kwargs it shares with the later callbacks' calls of the same
#: hook (see :func:`share_kwargs`), and the names the server itself passes.
_SHARED: ContextVar[tuple[dict[str, Any], Mapping[str, Any]] | None] = ContextVar(
    "llm_otel_callbacks_shared_kwargs", default=None
)


def share_kwargs(**values: Any) -> bool:
    """From a request hook: pass ``values`` as keyword arguments to the callbacks after this
    one, in their calls of the same hook for the same request.

    :class:`~llm_otel_callbacks.builtin.CostTracker` passes ``cost`` this way, which is how a
    later callback's ``on_llm_end`` gets ``kwargs["cost"]`` (seed 004). A name the server
    passes itself (``model``, ``prompt_tokens`` ...) cannot be replaced: ValueError. Returns
    False, passing nothing, where there is no later call to pass to: when the hook's callback
    is the only one implementing it, outside a request hook (a hook called directly, as in a
    unit test) and in ``on_llm_stream_chunk``.
    """
    state = _SHARED.get()
    if state is None:
        return False
    shared, server_kwargs = state
    taken = sorted(k for k in values if k in server_kwargs)
    if taken:
        raise ValueError(f"share_kwargs: {', '.join(taken)} passed by the server itself")
    shared.update(values)
    return True


class RequestRejected(Exception):
    """Raise from ``on_llm_start`` to refuse a request with an HTTP error.

    The client gets ``status_code`` with an OpenAI-style body
    ``{"error": {"message", "type", "param", "code"}}`` and, when ``retry_after_s`` is set and
    the app uses :class:`~llm_otel_callbacks.serve.ObservedOpenAiIngress`, a ``Retry-After``
    header. The rejection is counted in ``llm_callback_requests_rejected_total`` by ``reason``
    (keep reasons few: it is a metric label).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        reason: str = "rejected",
        code: str = "request_rejected",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.reason = reason
        self.code = code
        self.retry_after_s = retry_after_s
        #: Set by the dispatcher: the target whose hook rejected the request.
        self.rejected_by: str | None = None

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.reason,
                "param": None,
                "code": self.code,
            }
        }


class ResponseError(Exception):
    """An error response of the engine (e.g. a prompt too long), as ``on_llm_error`` sees it."""

    def __init__(self, message: str, *, status_code: int, error_type: str) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type


@dataclass(frozen=True)
class TokenUsage:
    """Token counts in the shape of an OpenAI ``usage`` object."""

    prompt_tokens: int | None
    completion_tokens: int | None

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


@dataclass
class StreamedResponse:
    """What ``on_llm_end`` gets for a streamed response (the chunks are already sent)."""

    id: str | None
    model: str
    usage: TokenUsage
    chunks: int
    finish_reasons: list[str] = field(default_factory=list)
    text: str | None = None
    """The streamed text, when a stream-chunk hook made the chunks be parsed."""

    @property
    def token_count(self) -> int | None:
        return self.usage.completion_tokens


class ChunkStats:
    """One stream's successful stream-chunk calls and their summed seconds, per target."""

    __slots__ = ("calls", "seconds")

    def __init__(self, targets: int) -> None:
        self.calls = [0] * targets
        self.seconds = [0.0] * targets


@dataclass(frozen=True)
class BoundHook:
    """One target's implementation of one request hook."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    raise_error: bool
    timeout_s: float | None
    pool: BoundedPool | None = None


def resolve(targets: Sequence[HookTarget], hook: str) -> tuple[BoundHook, ...]:
    """The targets implementing ``hook``, in order."""
    bound = []
    for target in targets:
        fn = getattr(target.instance, hook, None)
        if fn is None or not callable(fn):
            continue
        bound.append(
            BoundHook(
                target.name, fn, inspect.iscoroutinefunction(fn),
                bool(target.raise_error_on_callback), timeout_for(target.timeout_s, hook),
                target.pool,
            )
        )
    return tuple(bound)


class RequestHooks:
    """The request hooks of one replica, resolved once."""

    def __init__(
        self,
        targets: Sequence[HookTarget],
        calls: Recorder,
        model: str,
        *,
        durations: Recorder = NULL_RECORDER,
        record_exception_messages: bool = True,
    ) -> None:
        self.start = resolve(targets, ON_START)
        self.end = resolve(targets, ON_END)
        self.error = resolve(targets, ON_ERROR)
        self.chunk = resolve(targets, ON_CHUNK)
        self.any = bool(self.start or self.end or self.error or self.chunk)
        self._calls = calls
        self._durations = durations
        self._model = model
        # Off: spans and log lines get the error's type, never its message (secrets).
        self._record_message = record_exception_messages
        self._warned: set[tuple[str, str]] = set()

    async def run(
        self,
        hook: str,
        bound: tuple[BoundHook, ...],
        arg: Any,
        kwargs: Mapping[str, Any],
        span: Span,
        *,
        chunk_stats: ChunkStats | None = None,
    ) -> None:
        """Call ``hook`` on each target in order.

        Raises :class:`RequestRejected` (from ``on_llm_start``) and :class:`ChildHookError`
        (a target with the raise policy failed); everything else is recorded and swallowed.
        ``on_llm_end`` and ``on_llm_error`` are where targets clean up, so every target gets
        them even when one raises; the first error is raised after the last target ran.

        Each call is timed: a ``llm_callback.hook_call`` event on the request span and a point
        of the duration and calls metrics. Stream chunks (``chunk_stats`` given) are only
        added up here; :meth:`flush_chunks` records them once per stream.
        """
        finish_all = hook in (ON_END, ON_ERROR)
        first_error: ChildHookError | None = None
        shared: dict[str, Any] | None = None
        token = None
        if chunk_stats is None and len(bound) > 1:  # a later callback to pass kwargs to
            shared = {}
            token = _SHARED.set((shared, kwargs))
        try:
            for i, b in enumerate(bound):
                t0 = time.perf_counter()
                try:
                    if b.timeout_s is None:
                        result = b.fn(arg, **kwargs)
                        if b.is_async or inspect.isawaitable(result):
                            await result
                    else:
                        await call_async(functools.partial(b.fn, **kwargs), hook, b.timeout_s,
                                         arg, pool=b.pool)
                except RequestRejected as rejection:
                    if hook != ON_START:
                        self._failed(hook, b, rejection, span, time.perf_counter() - t0)
                        continue
                    # The hook did its job: a rejection is an ok call.
                    self._ok(hook, b, span, time.perf_counter() - t0)
                    rejection.rejected_by = b.name
                    raise
                except Exception as exc:
                    self._failed(hook, b, exc, span, time.perf_counter() - t0)
                    if b.raise_error:
                        error = ChildHookError(b.name, hook, exc)
                        error.__cause__ = exc
                        if not finish_all:
                            raise error from exc
                        if first_error is None:
                            first_error = error
                else:
                    if chunk_stats is None:
                        self._ok(hook, b, span, time.perf_counter() - t0)
                    else:
                        chunk_stats.calls[i] += 1
                        chunk_stats.seconds[i] += time.perf_counter() - t0
                if shared:
                    kwargs = {**kwargs, **shared}
                    shared.clear()
        finally:
            if token is not None:
                _SHARED.reset(token)
        if first_error is not None:
            raise first_error

    def flush_chunks(
        self, bound: tuple[BoundHook, ...], stats: ChunkStats, span: Span
    ) -> None:
        """Record one stream's successful chunk-hook calls: per target, one count of its
        calls, one duration point (their summed time) and one event."""
        recording = span.is_recording()
        for b, calls, seconds in zip(bound, stats.calls, stats.seconds, strict=True):
            if not calls:
                continue
            labels = (self._model, ON_CHUNK, b.name, catalog.OUTCOME_OK)
            self._calls.add(labels, float(calls))
            self._durations.record(labels, seconds,
                                   span.get_span_context() if recording else None)
            if recording:
                span.add_event(catalog.EVENT_HOOK_CALL, {
                    catalog.A_HOOK: ON_CHUNK, catalog.A_CALLBACK: b.name,
                    catalog.A_OUTCOME: catalog.OUTCOME_OK, catalog.A_HOOK_SECONDS: seconds,
                    catalog.A_HOOK_CALLS: calls,
                })

    def _ok(self, hook: str, b: BoundHook, span: Span, seconds: float) -> None:
        labels = (self._model, hook, b.name, catalog.OUTCOME_OK)
        self._calls.add(labels)
        if span.is_recording():  # the request's trace is the duration point's exemplar
            self._durations.record(labels, seconds, span.get_span_context())
            span.add_event(catalog.EVENT_HOOK_CALL, {
                catalog.A_HOOK: hook, catalog.A_CALLBACK: b.name,
                catalog.A_OUTCOME: catalog.OUTCOME_OK, catalog.A_HOOK_SECONDS: seconds,
            })
        else:
            self._durations.record(labels, seconds)

    def _failed(
        self, hook: str, b: BoundHook, exc: BaseException, span: Span, seconds: float
    ) -> None:
        outcome = outcome_of(exc)
        try:
            labels = (self._model, hook, b.name, outcome)
            self._calls.add(labels)
            self._durations.record(labels, seconds)
            if span.is_recording():
                if self._record_message:
                    span.record_exception(
                        exc, {catalog.A_HOOK: hook, catalog.A_CALLBACK: b.name,
                              catalog.A_OUTCOME: outcome},
                    )
                span.add_event(
                    catalog.EVENT_HOOK_ERROR,
                    {catalog.A_HOOK: hook, catalog.A_CALLBACK: b.name,
                     catalog.A_OUTCOME: outcome, catalog.A_RAISE: b.raise_error,
                     catalog.A_ERROR_TYPE: type(exc).__qualname__,
                     catalog.A_HOOK_SECONDS: seconds},
                )
        except Exception as telemetry_error:  # the telemetry path never fails a request
            logger.debug("request hook error not recorded: %s", telemetry_error)
        # Once per target and hook at WARNING, then DEBUG: a hook failing on every request
        # must not flood the replica log.
        key = (b.name, hook)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(
            level, "callback '%s' failed in request hook '%s' (%s): %s", b.name, hook,
            "request fails" if b.raise_error else "logged, request continues",
            error_text(exc, self._record_message),
        )
