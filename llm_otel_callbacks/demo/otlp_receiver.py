"""An OTLP/HTTP receiver for the tests and the benchmarks.

A stdlib ``ThreadingHTTPServer`` on 127.0.0.1 (free port) that accepts the
protobuf bodies an OTel SDK ``OTLPSpanExporter``/``OTLPMetricExporter`` (http)
posts to ``/v1/traces`` and ``/v1/metrics``, decodes them with the official proto
classes, and keeps plain-Python copies for assertions. Point exporters at
``receiver.endpoint`` (e.g. ``OTEL_EXPORTER_OTLP_ENDPOINT``).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex chars
    span_id: str  # 16 hex chars
    parent_span_id: str  # 16 hex chars, or "" for a root span
    attributes: dict[str, Any]
    resource_attributes: dict[str, Any]
    status_code: str  # "STATUS_CODE_UNSET" | "STATUS_CODE_OK" | "STATUS_CODE_ERROR"
    status_message: str
    events: list[tuple[str, dict[str, Any]]]
    start_time_unix_nano: int
    end_time_unix_nano: int
    kind: str = "SPAN_KIND_UNSPECIFIED"
    scope_name: str = ""

    @property
    def duration_s(self) -> float:
        return (self.end_time_unix_nano - self.start_time_unix_nano) / 1e9


@dataclass(frozen=True)
class ReceivedMetric:
    name: str
    kind: str  # the data oneof: "sum" | "gauge" | "histogram" | ...
    unit: str
    description: str
    resource_attributes: dict[str, Any]
    scope_name: str
    # One dict per data point: {"attributes": {...}, "value": ...} for sum/gauge,
    # {"attributes", "count", "sum", "bucket_counts", "explicit_bounds", "exemplars"} for
    # histograms (each exemplar: {"trace_id", "span_id"} in hex, "value").
    points: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    headers: dict[str, str]  # lower-cased names
    content_type: str
    content_encoding: str
    size: int  # body bytes as sent (before decompression)


def any_value(v: AnyValue) -> Any:
    """Convert an OTLP AnyValue to the matching Python value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attrs(v.kvlist_value.values)
    if which == "bytes_value":
        return bytes(v.bytes_value)
    return getattr(v, which)


def attrs(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def _points(metric: Any, kind: str) -> list[dict[str, Any]]:
    data = getattr(metric, kind)
    out: list[dict[str, Any]] = []
    for dp in data.data_points:
        p: dict[str, Any] = {"attributes": attrs(dp.attributes)}
        if kind in ("sum", "gauge"):
            p["value"] = getattr(dp, dp.WhichOneof("value")) if dp.WhichOneof("value") else None
        elif kind == "histogram":
            p.update(
                count=dp.count,
                sum=dp.sum,
                bucket_counts=list(dp.bucket_counts),
                explicit_bounds=list(dp.explicit_bounds),
                exemplars=[
                    {"trace_id": e.trace_id.hex(), "span_id": e.span_id.hex(),
                     "value": getattr(e, e.WhichOneof("value")) if e.WhichOneof("value")
                     else None}
                    for e in dp.exemplars
                ],
            )
        else:  # exponential histogram / summary: keep the count at least
            p["count"] = getattr(dp, "count", None)
        out.append(p)
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests.Session expects

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean

    def _reply(self, code: int, body: bytes, ctype: str = "application/x-protobuf") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        receiver = self.server.receiver
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        receiver._record_request(
            ReceivedRequest(
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                content_type=ctype,
                content_encoding=encoding,
                size=len(raw),
            )
        )
        if receiver.fail_status is not None:  # simulate a broken collector
            self._reply(receiver.fail_status, b"", "text/plain")
            return
        try:
            if encoding == "gzip":
                raw = gzip.decompress(raw)
            elif encoding == "deflate":
                raw = zlib.decompress(raw)
            elif encoding not in ("", "identity"):
                self._reply(415, b"unsupported encoding", "text/plain")
                return
            if ctype != "application/x-protobuf":
                self._reply(415, b"only application/x-protobuf", "text/plain")
                return
            path = self.path.split("?")[0]
            if path == TRACES_PATH:
                treq = ExportTraceServiceRequest.FromString(raw)
                receiver._add_traces(treq)
                self._reply(200, ExportTraceServiceResponse().SerializeToString())
            elif path == METRICS_PATH:
                mreq = ExportMetricsServiceRequest.FromString(raw)
                receiver._add_metrics(mreq)
                self._reply(200, ExportMetricsServiceResponse().SerializeToString())
            else:
                self._reply(404, b"", "text/plain")
        except Exception as exc:  # undecodable body: tell the exporter, and remember
            receiver._record_error(f"{self.path}: {exc!r}")
            self._reply(400, repr(exc).encode(), "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpHttpReceiver


class OtlpHttpReceiver:
    """Context manager: ``with OtlpHttpReceiver() as rx: ... rx.spans()``.

    All accessors return copies and are safe to call from any thread.
    Set ``fail_status`` (e.g. 503) to make every export fail with that code.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # Reentrant: wait_for_spans runs the caller's predicate under the lock,
        # and a predicate may call .spans() itself.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._spans: list[ReceivedSpan] = []
        self._metrics: list[ReceivedMetric] = []
        self._requests: list[ReceivedRequest] = []
        self._errors: list[str] = []
        self.fail_status: int | None = None
        self._server = _Server((host, port), _Handler)
        self._server.receiver = self
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return self.endpoint + TRACES_PATH

    @property
    def metrics_url(self) -> str:
        return self.endpoint + METRICS_PATH

    def start(self) -> OtlpHttpReceiver:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"otlp-receiver-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OtlpHttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- recording (handler threads) -------------------------------------
    def _record_request(self, req: ReceivedRequest) -> None:
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()

    def _record_error(self, msg: str) -> None:
        with self._cond:
            self._errors.append(msg)

    def _add_traces(self, req: ExportTraceServiceRequest) -> None:
        new: list[ReceivedSpan] = []
        for rs in req.resource_spans:
            res = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    new.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes=attrs(s.attributes),
                            resource_attributes=dict(res),
                            status_code=Status.StatusCode.Name(s.status.code),
                            status_message=s.status.message,
                            events=[(e.name, attrs(e.attributes)) for e in s.events],
                            start_time_unix_nano=s.start_time_unix_nano,
                            end_time_unix_nano=s.end_time_unix_nano,
                            kind=s.SpanKind.Name(s.kind),
                            scope_name=ss.scope.name,
                        )
                    )
        with self._cond:
            self._spans.extend(new)
            self._cond.notify_all()

    def _add_metrics(self, req: ExportMetricsServiceRequest) -> None:
        new: list[ReceivedMetric] = []
        for rm in req.resource_metrics:
            res = attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data") or ""
                    new.append(
                        ReceivedMetric(
                            name=m.name,
                            kind=kind,
                            unit=m.unit,
                            description=m.description,
                            resource_attributes=dict(res),
                            scope_name=sm.scope.name,
                            points=_points(m, kind) if kind else [],
                        )
                    )
        with self._cond:
            self._metrics.extend(new)
            self._cond.notify_all()

    # -- queries -----------------------------------------------------------
    def spans(self, name: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if name is None or s.name == name]

    def metrics(self, name: str | None = None) -> list[ReceivedMetric]:
        """Every metric message received (one per export per metric), in order."""
        with self._lock:
            return [m for m in self._metrics if name is None or m.name == name]

    def metric_names(self) -> set[str]:
        with self._lock:
            return {m.name for m in self._metrics}

    def requests(self, path: str | None = None) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self._requests if path is None or r.path == path]

    def headers_seen(self) -> list[dict[str, str]]:
        """Request headers of every POST so far (names lower-cased)."""
        with self._lock:
            return [dict(r.headers) for r in self._requests]

    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._metrics.clear()
            self._requests.clear()
            self._errors.clear()

    def _wait(self, get: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = get()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} after {timeout:.1f}s; {self._summary()}")
                # Woken on every new export; the cap also covers time-based predicates.
                self._cond.wait(min(left, 0.2))

    def _summary(self) -> str:
        names = sorted({s.name for s in self._spans})
        return f"spans seen: {names}, metrics seen: {sorted({m.name for m in self._metrics})}"

    def wait_for_spans(
        self,
        predicate: Callable[[list[ReceivedSpan]], bool] | None = None,
        timeout: float = 10.0,
    ) -> list[ReceivedSpan]:
        """Poll until ``predicate(all_spans)`` is true (default: any span); return all spans.

        Raises TimeoutError listing what was seen.
        """
        pred = predicate or bool

        def get() -> list[ReceivedSpan] | None:
            snap = list(self._spans)  # lock is held by _wait
            return snap if pred(snap) else None

        result: list[ReceivedSpan] = self._wait(get, timeout, "matching spans")
        return result

    def wait_for_span(self, name: str, timeout: float = 10.0) -> ReceivedSpan:
        """Wait for the first span called ``name`` and return it."""
        spans = self.wait_for_spans(lambda ss: any(s.name == name for s in ss), timeout)
        return next(s for s in spans if s.name == name)

    def wait_for_metric(self, name: str, timeout: float = 10.0) -> list[ReceivedMetric]:
        """Wait until metric ``name`` was received; return every message for it."""

        def get() -> list[ReceivedMetric]:
            return [m for m in self._metrics if m.name == name]

        result: list[ReceivedMetric] = self._wait(get, timeout, f"metric {name!r}")
        return result
