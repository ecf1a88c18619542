"""W3C trace context carried across Ray's pickle into the per-node download tasks.

The carrier is a plain ``dict[str, str]`` (``traceparent`` / ``tracestate``) stored on the
callback instance, so it travels with the pickled ``LLMConfig`` and the download-hook spans
on every node join the replica's startup trace.
"""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.trace import Span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def carrier_for(span: Span) -> dict[str, str]:
    """A W3C carrier whose parent is ``span`` (empty when the span is not recording)."""
    carrier: dict[str, str] = {}
    if span.get_span_context().is_valid:
        _PROPAGATOR.inject(carrier, context=set_span_in_context(span))
    return carrier


def context_from(carrier: dict[str, str] | None) -> Context | None:
    """The parent context a carrier describes, or None."""
    if not carrier:
        return None
    return _PROPAGATOR.extract(carrier)
