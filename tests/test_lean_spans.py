"""Lean spans export exactly what the SDK's spans export for the same calls, under the same
limits and samplers, and the tracer hands out SDK spans whenever a lean span could differ."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
    set_span_in_context,
)

from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry
from llm_otel_callbacks.telemetry.export import SpanQueueProcessor
from llm_otel_callbacks.telemetry.lean_spans import LeanSpan, LeanTracer, OwnTracerProvider
from llm_otel_callbacks.telemetry.otlp_http import SpanEncoder
from llm_otel_callbacks.telemetry.settings import TelemetrySettings

RESOURCE = Resource({"service.name": "lean-test", "n": 1})
REMOTE = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1),
                     trace_state=TraceState([("k", "v")]))


class _CountingIds(IdGenerator):
    """The same ids for both tracers, so their exports can be compared field by field."""

    def __init__(self) -> None:
        self.n = 0

    def generate_span_id(self) -> int:
        self.n += 1
        return self.n

    def generate_trace_id(self) -> int:
        self.n += 1
        return (0xABC << 64) + self.n


class _Printable:
    def __str__(self) -> str:
        return "printable"


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


def _sdk_spans(script: Callable[[Tracer], None], sampler: Any = None) -> list[Any]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, id_generator=_CountingIds(), sampler=sampler,
                              shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    script(provider.get_tracer("scope", "1.0", schema_url="https://s/1"))
    return list(memory.get_finished_spans())


def _lean_spans(script: Callable[[Tracer], None], sampler: Any = None) -> list[Any]:
    memory = InMemorySpanExporter()
    provider = OwnTracerProvider(resource=RESOURCE, id_generator=_CountingIds(),
                                 sampler=sampler, shutdown_on_exit=False,
                                 span_limits=SpanLimits())
    processor = SpanQueueProcessor(memory, schedule_delay_s=0.05)
    provider.add_span_processor(processor)
    tracer = LeanTracer(provider, provider.get_tracer("scope", "1.0", schema_url="https://s/1"))
    assert tracer.lean
    script(tracer)
    assert processor.force_flush(5_000)
    processor.shutdown()
    spans = list(memory.get_finished_spans())
    assert all(isinstance(span, LeanSpan) for span in spans)
    return spans


def _normalized(spans: list[Any]) -> ExportTraceServiceRequest:
    """The export request, with the times and stack traces no two runs share set aside."""
    request = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.start_time_unix_nano = span.end_time_unix_nano = 0
                for event in span.events:
                    event.time_unix_nano = 0
                    for kv in event.attributes:
                        if kv.key == "exception.stacktrace":
                            kv.value.string_value = "<stack>"
    return request


def _every_call(tracer: Tracer) -> None:
    root = tracer.start_span("root", kind=SpanKind.SERVER, attributes={
        "s": "text é", "i": 7, "b": False, "f": 1.25, "ss": ["a", "b"], "ii": (1, 2)})
    root.set_attribute("later", 5)
    root.set_attributes({"s": "replaced", "list": ["x"], "odd": _Printable()})
    root.add_event("ev", {"k": "v", "n": 3, "ll": [1, 2]})
    root.add_event("bare")
    root.update_name("root renamed")
    root.record_exception(ValueError("boom"), {"extra": 1})
    root.set_status(Status(StatusCode.ERROR, "it failed"))
    root.set_status(StatusCode.UNSET)  # ignored: UNSET is never set
    child = tracer.start_span("child", context=set_span_in_context(root),
                              kind=SpanKind.CLIENT, links=[Link(REMOTE, {"l": 1})])
    child.add_link(REMOTE, {"m": 2})
    child.set_status(Status(StatusCode.OK))
    child.set_status(StatusCode.ERROR, "ignored: OK is final")
    child.end()
    tracer.start_span("remote parent", context=set_span_in_context(NonRecordingSpan(REMOTE)),
                      kind=SpanKind.CONSUMER).end()
    with pytest.raises(KeyError), tracer.start_as_current_span("as current") as current:
        current.set_attribute("inside", True)
        raise KeyError("k")
    root.end()
    root.set_attribute("after end", 1)  # ignored once ended
    root.add_event("after end")
    root.end()  # a second end changes nothing


def test_lean_spans_export_what_sdk_spans_export_for_every_span_call() -> None:
    sdk, lean = _sdk_spans(_every_call), _lean_spans(_every_call)
    assert [s.name for s in lean] == ["child", "remote parent", "as current", "root renamed"]
    assert _normalized(lean) == _normalized(sdk)
    ours = ExportTraceServiceRequest.FromString(SpanEncoder().encode(lean))
    assert ours == ExportTraceServiceRequest.FromString(encode_spans(lean).SerializeToString())
    assert all(f'"name": "{s.name}"' in s.to_json() for s in lean)


def _over_the_limits(tracer: Tracer) -> None:
    span = tracer.start_span("full", attributes={f"a{i}": i for i in range(5)})
    for i in range(5, 8):
        span.set_attribute(f"a{i}", i)
    span.set_attribute("a7", "same key: nothing dropped")
    for i in range(4):
        span.add_event(f"e{i}")
    span.end()


def test_lean_spans_drop_the_oldest_attributes_and_events_past_the_count_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "2")
    sdk, lean = _sdk_spans(_over_the_limits), _lean_spans(_over_the_limits)
    assert dict(lean[0].attributes) == {"a5": 5, "a6": 6, "a7": "same key: nothing dropped"}
    assert (lean[0].dropped_attributes, lean[0].dropped_events) == (5, 2)
    assert _normalized(lean) == _normalized(sdk)


def _many_roots(tracer: Tracer) -> None:
    for i in range(40):
        tracer.start_span(f"s{i}").end()
    tracer.start_span("child of unsampled",
                      context=set_span_in_context(NonRecordingSpan(SpanContext(
                          0x99, 0x98, is_remote=True, trace_flags=TraceFlags(0))))).end()
    tracer.start_span("child of sampled", context=set_span_in_context(NonRecordingSpan(
        REMOTE))).end()


@pytest.mark.parametrize("sampler", [
    sampling.ParentBased(sampling.TraceIdRatioBased(0.5)),
    sampling.ALWAYS_OFF,
    sampling.ParentBased(sampling.ALWAYS_ON),
], ids=["ratio", "always_off", "parent_based"])
def test_lean_tracer_samples_the_spans_the_sdk_samples(sampler: Any) -> None:
    sdk = _sdk_spans(_many_roots, sampler)
    lean = _lean_spans(_many_roots, sampler)
    assert [s.name for s in lean] == [s.name for s in sdk]
    assert "child of unsampled" not in [s.name for s in lean]
    assert _normalized(lean) == _normalized(sdk)


def test_only_the_default_sampler_is_decided_without_asking_it() -> None:
    def follows(sampler: Any) -> bool:
        provider = OwnTracerProvider(sampler=sampler, shutdown_on_exit=False,
                                     span_limits=SpanLimits())
        return LeanTracer(provider, provider.get_tracer("scope"))._follows_parent

    assert follows(sampling.DEFAULT_ON) and follows(sampling.ParentBased(sampling.ALWAYS_ON))
    assert not follows(sampling.ParentBased(sampling.TraceIdRatioBased(0.5)))
    assert not follows(sampling.ALWAYS_ON)  # ignores an unsampled parent: asked
    assert not follows(sampling.ParentBased(sampling.ALWAYS_ON,
                                            remote_parent_not_sampled=sampling.ALWAYS_ON))


def test_a_foreign_processor_gets_sdk_spans_and_sees_every_span_end() -> None:
    provider = OwnTracerProvider(resource=RESOURCE, shutdown_on_exit=False,
                                 span_limits=SpanLimits())
    queued = InMemorySpanExporter()
    provider.add_span_processor(SpanQueueProcessor(queued, schedule_delay_s=0.05))
    tracer = LeanTracer(provider, provider.get_tracer("scope"))
    assert isinstance(tracer.start_span("lean"), LeanSpan)
    foreign = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(foreign))
    assert not tracer.lean
    span = tracer.start_span("sdk")
    assert not isinstance(span, LeanSpan)
    span.end()
    assert [s.name for s in foreign.get_finished_spans()] == ["sdk"]
    provider.shutdown()
    assert [s.name for s in queued.get_finished_spans()] == ["sdk"]


def test_an_attribute_length_limit_gets_sdk_spans_that_truncate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    provider = OwnTracerProvider(resource=RESOURCE, shutdown_on_exit=False,
                                 span_limits=SpanLimits())
    memory = InMemorySpanExporter()
    provider.add_span_processor(SpanQueueProcessor(memory, schedule_delay_s=0.05))
    tracer = LeanTracer(provider, provider.get_tracer("scope"))
    assert not tracer.lean
    span = tracer.start_span("long", attributes={"s": "abcdefgh"})
    span.end()
    provider.shutdown()
    (exported,) = memory.get_finished_spans()
    assert not isinstance(exported, LeanSpan)
    assert exported.attributes["s"] == "abcd"


def test_the_package_tracer_is_lean_and_an_installed_provider_is_not_wrapped() -> None:
    own = get_telemetry(TelemetrySettings(traces_file=None, endpoint="http://127.0.0.1:9",
                                          metrics_backend="none"))
    assert isinstance(own.tracer, LeanTracer)
    assert own.tracer.lean
    reset_telemetry()
    installed = TracerProvider(shutdown_on_exit=False)
    from opentelemetry import trace

    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = installed
    try:
        reused = get_telemetry(TelemetrySettings(metrics_backend="none"))
        assert not isinstance(reused.tracer, LeanTracer)
        assert reused.tracer_provider is installed
    finally:
        trace._TRACER_PROVIDER = previous
