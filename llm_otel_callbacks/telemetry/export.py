"""Span exporters that can never stall or fail a hook.

Spans reach these only through a ``BatchSpanProcessor``, whose worker thread is the one that
waits on the network, so a hook only ever appends to a bounded queue. On top of that,
:class:`GuardedSpanExporter` backs off after a failure, so a dead collector costs one
connection attempt per back-off window rather than one per batch, and counts what it drops.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger(__name__)


class GuardedSpanExporter(SpanExporter):
    """Wraps an exporter: exponential back-off after failures, failures counted, never raises."""

    def __init__(
        self,
        inner: SpanExporter,
        on_failure: Callable[[int], None] | None = None,
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        self._inner = inner
        self._on_failure = on_failure
        self._min = min_backoff_s
        self._max = max_backoff_s
        self._backoff = 0.0
        self._retry_at = 0.0
        self._warned = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if time.monotonic() < self._retry_at:
            self._failed(len(spans))
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            logger.debug("span export raised: %s", type(exc).__name__)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._backoff = 0.0
            return result
        self._backoff = min(self._max, max(self._min, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff
        self._failed(len(spans))
        if not self._warned:
            # Once per process: the endpoint is not logged (it may carry credentials).
            logger.warning(
                "llm_otel_callbacks: span export failed; backing off (spans are dropped, "
                "hooks are unaffected)"
            )
            self._warned = True
        return result

    def _failed(self, count: int) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(count)
            except Exception:
                pass

    def shutdown(self) -> None:
        try:
            self._inner.shutdown()
        except Exception:
            pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        try:
            return bool(self._inner.force_flush(timeout_millis))
        except Exception:
            return False


class OtlpJsonFileSpanExporter(SpanExporter):
    """The embedded default sink: one OTLP/JSON ``ExportTraceServiceRequest`` per line.

    The format is the OTLP/JSON mapping (ids in hex), which the OpenTelemetry Collector's
    ``otlpjsonfile`` receiver reads back, so a run without a collector can still be loaded
    into one later. Safe for several processes appending to one file (one write per batch).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from google.protobuf.json_format import MessageToDict
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        message = MessageToDict(encode_spans(spans))
        _hex_ids(message)
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._lock:
            # O_APPEND keeps lines from different processes whole.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(node: Any) -> None:
    """protobuf's JSON mapping writes bytes as base64; OTLP/JSON wants trace/span ids in hex."""
    import base64

    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)
