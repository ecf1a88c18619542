"""One trace per request, into vLLM: our request span's context in the headers vLLM reads.

Ray 2.60 passes the HTTP request's headers to the engine as ``RawRequestInfo.headers``;
``VLLMEngine`` turns them into the Starlette request that vLLM's OpenAI serving layer reads,
and, when vLLM's request tracing is on (its ``otlp_traces_endpoint`` engine argument), vLLM
extracts ``traceparent``/``tracestate`` from them into the ``trace_headers`` of its
``generate`` call, so its ``llm_request`` span gets that parent. ObservedLLMServer therefore
hands the engine a copy of the headers whose trace context is our request span's: vLLM's
request span becomes its child, under Serve's ingress span. The client's own headers are left
as they are otherwise, and nothing changes when vLLM's tracing is off (vLLM would only warn
about trace headers it cannot use).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opentelemetry.trace import Span

from .._ray import raw_request_info_class
from ..telemetry.propagation import carrier_for

_TRACE_KEYS = ("traceparent", "tracestate")


def vllm_traces_requests(llm_config: Any) -> bool:
    """Whether the deployment turned on vLLM's own request tracing."""
    try:
        kwargs = llm_config.engine_kwargs or {}
        return bool(kwargs.get("otlp_traces_endpoint"))
    except Exception:
        return False


def with_trace_headers(raw: Any, span: Span) -> Any:
    """``raw`` (a ``RawRequestInfo`` or None) with ``span`` as the trace parent in its headers;
    ``raw`` unchanged when the span is not recording or anything is unexpected."""
    carrier = carrier_for(span)
    if not carrier:
        return raw
    try:
        if raw is None:
            info = raw_request_info_class()
            return raw if info is None else info(headers=dict(carrier))
        headers = {k: v for k, v in dict(raw.headers).items() if k.lower() not in _TRACE_KEYS}
        headers.update(carrier)
        return dataclasses.replace(raw, headers=headers)
    except Exception:
        return raw
