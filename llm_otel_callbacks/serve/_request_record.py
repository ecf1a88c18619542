"""One request's record, what is read from its request and response, and what it writes into
telemetry when the request ends.

:class:`Record` is what the observer keeps per request; :class:`RequestTelemetry` turns a
finished record into span attributes, the span's end and the GenAI metrics. Recording never
raises: the telemetry path never fails a request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanContext, Status, StatusCode

from .. import catalog
from .._request_hooks import ChunkStats, ResponseError
from ..telemetry.providers import Telemetry
from .hook_kwargs import RequestKwargs

logger = logging.getLogger(__name__)


class Record:
    """One request. Slots: the stream loop touches these on every chunk."""

    __slots__ = (
        "chunk_calls", "chunk_tokens", "chunks", "completion_tokens", "ctx", "done", "error",
        "exemplar", "first", "kwargs", "labels", "last", "op", "prompt_tokens", "span", "stream",
        "t0", "text", "tokens_end", "trace_id",
    )

    def __init__(self, op: str, labels: Labels, stream: bool) -> None:
        self.t0 = time.perf_counter()
        self.op = op
        self.labels = labels
        self.stream = stream
        self.span: Span = INVALID_SPAN
        self.ctx: Context | None = None
        self.trace_id: str | None = None
        self.exemplar: SpanContext | None = None  # the span's context when it records
        self.kwargs: RequestKwargs | None = None  # built when some target has request hooks
        self.chunks = 0
        self.chunk_calls: ChunkStats | None = None
        self.chunk_tokens: int | None = None
        self.first: float | None = None
        self.tokens_end: float | None = None
        self.last: str | None = None
        self.done = False
        self.error: BaseException | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.text: list[str] | None = None


class Labels:
    """Metric label tuples of one operation, built once."""

    __slots__ = ("base", "errors", "input", "ok", "output")

    def __init__(self, op: str, provider: str, model: str) -> None:
        self.base = (op, provider, model)
        self.ok = (*self.base, "")
        self.input = (*self.base, catalog.TOKEN_TYPE_INPUT)
        self.output = (*self.base, catalog.TOKEN_TYPE_OUTPUT)
        self.errors: dict[str, tuple[str, ...]] = {}

    def error(self, error_type: str) -> tuple[str, ...]:
        labels = self.errors.get(error_type)
        if labels is None:
            labels = self.errors[error_type] = (*self.base, error_type)
        return labels


class RequestTelemetry:
    """The GenAI metrics and span endings of one replica's requests."""

    def __init__(self, tel: Telemetry, record_exception_messages: bool = True) -> None:
        self._record_message = record_exception_messages
        self._duration = tel.recorder(catalog.GENAI_REQUEST_DURATION)
        self._ttft = tel.recorder(catalog.GENAI_TIME_TO_FIRST_TOKEN)
        self._tpot = tel.recorder(catalog.GENAI_TIME_PER_OUTPUT_TOKEN)
        self._tokens = tel.recorder(catalog.GENAI_TOKEN_USAGE)

    def response_attributes(
        self, rec: Record, response_id: Any, response_model: Any, finish: list[str]
    ) -> None:
        span = rec.span
        if not span.is_recording():
            return
        try:
            # One set_attributes call: the SDK's set_attribute builds a dict and takes the
            # span's lock per attribute.
            attrs: dict[str, Any] = {}
            if response_id:
                attrs[catalog.A_GENAI_RESPONSE_ID] = str(response_id)
            if response_model:
                attrs[catalog.A_GENAI_RESPONSE_MODEL] = str(response_model)
            if finish:
                attrs[catalog.A_GENAI_FINISH_REASONS] = finish
            if rec.prompt_tokens is not None:
                attrs[catalog.A_GENAI_INPUT_TOKENS] = rec.prompt_tokens
            if rec.completion_tokens is not None:
                attrs[catalog.A_GENAI_OUTPUT_TOKENS] = rec.completion_tokens
            if rec.stream:
                attrs[catalog.A_CHUNKS] = rec.chunks
                if rec.first is not None:
                    attrs[catalog.A_TTFT] = rec.first - rec.t0
            span.set_attributes(attrs)
        except Exception as exc:
            logger.debug("span attributes not set: %s", exc)

    def succeeded(self, rec: Record) -> None:
        rec.done = True
        try:
            now = time.perf_counter()
            labels = rec.labels
            exemplar = rec.exemplar
            self._duration.record(labels.ok, now - rec.t0, exemplar)
            if rec.prompt_tokens is not None:
                self._tokens.record(labels.input, float(rec.prompt_tokens), exemplar)
            if rec.completion_tokens is not None:
                self._tokens.record(labels.output, float(rec.completion_tokens), exemplar)
            if rec.first is not None:
                self._ttft.record(labels.base, rec.first - rec.t0, exemplar)
                out = rec.completion_tokens
                if out is not None and out > 1 and rec.tokens_end is not None:
                    self._tpot.record(labels.base, (rec.tokens_end - rec.first) / (out - 1),
                                      exemplar)
            rec.span.end()
        except Exception as exc:  # the telemetry path never fails a request
            logger.debug("request telemetry not recorded: %s", exc)

    def end_error(
        self, rec: Record, error: BaseException, error_type: str, status: int | None
    ) -> None:
        try:
            span = rec.span
            if span.is_recording():
                span.set_attribute(catalog.A_ERROR_TYPE, error_type)
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                if self._record_message:
                    span.set_status(Status(StatusCode.ERROR, f"{error_type}: {error}"))
                else:
                    span.set_status(Status(StatusCode.ERROR, error_type))
            span.end()
            self._duration.record(
                rec.labels.error(error_type), time.perf_counter() - rec.t0, rec.exemplar
            )
        except Exception as exc:
            logger.debug("request error not recorded: %s", exc)


def sampling_attributes(request: Any, attrs: dict[str, Any]) -> None:
    """Span attributes of the sampling parameters the request sets."""
    # Read the stored values: vLLM marks max_tokens deprecated, and reading it through the
    # attribute warns on every request.
    values = getattr(request, "__dict__", {})
    max_tokens = values.get("max_completion_tokens") or values.get("max_tokens")
    if isinstance(max_tokens, int):
        attrs[catalog.A_GENAI_MAX_TOKENS] = max_tokens
    temperature = values.get("temperature")
    if isinstance(temperature, (int, float)):
        attrs[catalog.A_GENAI_TEMPERATURE] = float(temperature)
    top_p = values.get("top_p")
    if isinstance(top_p, (int, float)):
        attrs[catalog.A_GENAI_TOP_P] = float(top_p)


def prompt_of(op: str, request: Any) -> Any:
    """``prompt`` of ``on_llm_start``: chat messages, the completion prompt, embedding input."""
    if op == "chat":
        return getattr(request, "messages", None)
    if op == "completions":
        return getattr(request, "prompt", None)
    return getattr(request, "input", None)


def api_key_id(raw: Any) -> str | None:
    """A short digest of the bearer token: enough to tell keys apart, never the key."""
    headers = getattr(raw, "headers", None)
    if not headers:
        return None
    value = headers.get("authorization") or headers.get("Authorization")
    if not value:
        return None
    token = value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value
    return hashlib.sha256(token.strip().encode()).hexdigest()[:16]


def response_error(item: Any) -> ResponseError:
    """The error an engine ``ErrorResponse`` carries (message, code, type)."""
    info = getattr(item, "error", None)
    return ResponseError(
        str(getattr(info, "message", "error")),
        status_code=int(getattr(info, "code", 500) or 500),
        error_type=str(getattr(info, "type", None) or "ErrorResponse"),
    )
