"""The lean OTLP/HTTP span exporter sends what the SDK's encoder would, and the gRPC exporter
makes one attempt per export (the guard backs off and counts drops), like OTLP/HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from llm_otel_callbacks import RayServeLLMCallback
from llm_otel_callbacks.demo.ports import free_port
from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry
from llm_otel_callbacks.telemetry.otlp_http import SpanEncoder
from tests._support.otlp_receiver import OtlpHttpReceiver


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


def _spans() -> list[Any]:
    """Spans with every field the encoder writes, from two providers (two resources)."""
    out: list[Any] = []
    for service in ("a", "b"):
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource({"service.name": service, "n": 3,
                                                     "ok": True, "f": 0.5}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("scope-one", "1.2", schema_url="https://s/1")
        other = provider.get_tracer("scope-two")
        remote = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1),
                             trace_state=TraceState([("k", "v"), ("x", "y")]))
        with tracer.start_as_current_span("root", kind=SpanKind.SERVER, attributes={
            "s": "text é", "i": 7, "neg": -3, "b": False, "f": 1.25, "empty": "",
            "ss": ["a", "b"], "ii": [1, 2], "ff": [0.5], "bb": [True, False],
            "n": 3, "ok": True,  # as on the resource: the same pair under another field tag
        }) as root:
            root.add_event("ev", {"k": "v", "n": 3})
            root.add_event("bare")
            root.set_status(Status(StatusCode.ERROR, "it failed"))
            with other.start_as_current_span("child", kind=SpanKind.CLIENT,
                                             links=[Link(remote, {"l": 1})]) as child:
                child.set_status(Status(StatusCode.OK))
        tracer.start_span("remote parent", context=set_span_in_context(
            NonRecordingSpan(remote)), kind=SpanKind.CONSUMER).end()
        tracer.start_span("producer", kind=SpanKind.PRODUCER).end()
        out.extend(memory.get_finished_spans())
    return out


def test_lean_encoder_writes_what_the_sdk_encoder_writes() -> None:
    spans = _spans()
    encoder = SpanEncoder()
    for _ in range(2):  # the second round comes from the caches
        ours = ExportTraceServiceRequest.FromString(encoder.encode(spans))
        sdk = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())
        assert ours == sdk


def test_lean_exporter_delivers_spans_to_a_receiver() -> None:
    class Hooks(RayServeLLMCallback):
        def on_before_node_init(self) -> None:
            return None

    with OtlpHttpReceiver() as rx:
        cb = Hooks(llm_config=None, ctx_kwargs={}, telemetry={
            "endpoint": rx.endpoint, "schedule_delay_ms": 50, "metrics_backend": "none",
            "headers": {"x-tenant": "t1"}})
        cb.run_callback_sync("on_before_node_init")
        cb.run_callback_sync("on_before_node_init")
        spans = rx.wait_for_spans(lambda ss: len(ss) >= 2, timeout=10)
        assert {s.name for s in spans} == {"llm_callback on_before_node_init"}
        assert all(s.resource_attributes["service.name"] == "ray-serve-llm" for s in spans)
        assert all(h.get("x-tenant") == "t1" for h in rx.headers_seen())
        tel = get_telemetry(cb.telemetry_settings)
        exporter = tel.span_processors[0].exporter
        assert type(exporter._inner).__name__ == "LeanOtlpHttpSpanExporter"


class _UnavailableCollector:
    """A gRPC server whose trace Export always answers UNAVAILABLE (a retryable code for the
    SDK), counting the attempts."""

    def __init__(self) -> None:
        import grpc

        self.attempts = 0
        self._lock = threading.Lock()

        def export(request: bytes, context: Any) -> bytes:
            with self._lock:
                self.attempts += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
            return b""

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        )
        self.port = free_port()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((handler,))
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)


def test_grpc_export_is_one_attempt_then_backs_off_with_drops_counted() -> None:
    from llm_otel_callbacks import catalog

    class Hooks(RayServeLLMCallback):
        def on_before_node_init(self) -> None:
            return None

    collector = _UnavailableCollector()
    try:
        cb = Hooks(llm_config=None, ctx_kwargs={}, telemetry={
            "endpoint": f"http://127.0.0.1:{collector.port}", "protocol": "grpc",
            "schedule_delay_ms": 50, "metrics_backend": "prometheus", "export_timeout_s": 30})
        cb.run_callback_sync("on_before_node_init")
        tel = get_telemetry(cb.telemetry_settings)
        processor = tel.span_processors[0]
        assert processor.force_flush(20_000)
        guard = processor.exporter
        assert guard.attempts == 1
        assert collector.attempts == 1  # the SDK would have retried UNAVAILABLE for 30 s
        assert guard.backing_off
        cb.run_callback_sync("on_before_node_init")  # dropped while backing off, counted
        assert processor.force_flush(20_000)
        assert collector.attempts == 1
        import prometheus_client

        dropped = {reason: prometheus_client.REGISTRY.get_sample_value(
            catalog.EXPORT_FAILURES.name + "_total", {"signal": "traces", "reason": reason})
            for reason in ("export_failed", "backoff")}
        assert (dropped["export_failed"] or 0) >= 1
        assert (dropped["backoff"] or 0) >= 1
    finally:
        collector.stop()
