"""One observed hook call: a span, a duration, an outcome, two metric updates.

Kept apart from the dispatch so the base class and the composite (one call per child) share
exactly the same telemetry, and so the hot path stays a handful of attribute lookups.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, set_span_in_context

from . import catalog
from ._callers import HookTimeoutError
from .telemetry.providers import Telemetry


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return catalog.OUTCOME_OK
    if isinstance(exc, HookTimeoutError):
        return catalog.OUTCOME_TIMEOUT
    return catalog.OUTCOME_ERROR


class HookObserver:
    """Span + metrics around hook calls for one (process, callback, model).

    Attribute dicts and metric label tuples are built once per hook name and reused.
    """

    __slots__ = ("_attrs", "_calls", "_duration", "_tracer", "class_name", "model", "name", "tel")

    def __init__(self, tel: Telemetry, name: str, class_name: str, model: str) -> None:
        self.tel = tel
        self.name = name
        self.class_name = class_name
        self.model = model
        self._tracer = tel.tracer
        self._duration = tel.recorder(catalog.HOOK_DURATION)
        self._calls = tel.recorder(catalog.HOOK_CALLS)
        self._attrs: dict[str, dict[str, Any]] = {}

    def _attributes(self, hook: str) -> dict[str, Any]:
        attrs = self._attrs.get(hook)
        if attrs is None:
            attrs = {
                catalog.A_HOOK: hook,
                catalog.A_CLASS: self.class_name,
                catalog.A_CALLBACK: self.name,
                catalog.A_MODEL: self.model,
                catalog.A_PID: self.tel.process_attributes["process.pid"],
            }
            node = self.tel.process_attributes.get(catalog.R_RAY_NODE)
            if node:
                attrs[catalog.A_NODE_ID] = node
            self._attrs[hook] = attrs
        return attrs

    def start(
        self, hook: str, parent: Context | None, span_name: str | None = None
    ) -> tuple[Span, object, float]:
        """Open the hook span, make it current, and start the clock."""
        span = self._tracer.start_span(
            span_name or catalog.SPAN_HOOK_PREFIX + hook,
            context=parent,
            attributes=self._attributes(hook),
        )
        token = otel_context.attach(set_span_in_context(span, parent))
        return span, token, time.perf_counter()

    def finish(
        self,
        hook: str,
        started: tuple[Span, object, float],
        exc: BaseException | None,
        *,
        record_message: bool = True,
    ) -> str:
        """Close the span, record the metrics; returns the outcome."""
        span, token, t0 = started
        elapsed = time.perf_counter() - t0
        outcome = outcome_of(exc)
        otel_context.detach(token)  # type: ignore[arg-type]
        exemplar = None
        if span.is_recording():
            span.set_attribute(catalog.A_OUTCOME, outcome)
            if exc is not None:
                span.set_attribute("error.type", type(exc).__qualname__)
                if record_message:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                else:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            exemplar = span.get_span_context()
        span.end()
        labels = (self.model, hook, self.name, outcome)
        self._duration.record(labels, elapsed, exemplar)
        self._calls.add(labels)
        return outcome


def error_text(error: BaseException | str | None, with_message: bool) -> str:
    """An error for a log line, a span status or a client: ``Type: message``, or only the
    type when messages are kept in (``record_exception_messages: false``: they may carry
    secrets). A :class:`~llm_otel_callbacks.ChildHookError` keeps its callback and hook."""
    if error is None:
        return ""
    if isinstance(error, str):
        return error
    if with_message:
        return f"{type(error).__name__}: {error}"
    summary = getattr(error, "summary", None)  # ChildHookError: names, cause type
    return summary if isinstance(summary, str) else type(error).__name__
