"""Unit tests of the core that need no Ray cluster (OTel in-memory exporters are fine here)."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_otel_callbacks import CallbackConfigError, RayServeLLMCallback, TelemetrySettings, catalog
from llm_otel_callbacks._ray import CallbackBase
from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry
from tests._support.otlp_receiver import OtlpHttpReceiver


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


class AsyncHooks(RayServeLLMCallback):
    async def on_before_download_model_files_distributed(self) -> None:
        await asyncio.sleep(0)
        self.ran = True

    def after_unpickle(self) -> None:
        self.unpickled_here = True


def test_settings_precedence_kwargs_over_env_over_defaults() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret,x-team=llm",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    s = TelemetrySettings.resolve({"service_name": "from-kwargs"}, env)
    assert s.endpoint == "http://env:4318"
    assert s.protocol == "grpc"
    assert s.headers["authorization"].get_secret_value() == "Bearer s3cret"
    assert s.service_name == "from-kwargs"
    assert s.resource_attributes == {"deployment.environment": "prod"}
    assert (s.sampler, s.sampler_arg) == ("traceidratio", 0.25)
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())
    assert TelemetrySettings.resolve(None, {}).service_name == "ray-serve-llm"
    assert TelemetrySettings.resolve(None, {"OTEL_SDK_DISABLED": "true"}).enabled is False


def test_span_schedule_defaults_to_the_sdk_5s_and_honours_otel_bsp_schedule_delay() -> None:
    assert TelemetrySettings.resolve(None, {}).schedule_delay_ms == 5_000
    env = {"OTEL_BSP_SCHEDULE_DELAY": "250"}
    assert TelemetrySettings.resolve(None, env).schedule_delay_ms == 250
    assert TelemetrySettings.resolve({"schedule_delay_ms": 40}, env).schedule_delay_ms == 40


def test_bad_telemetry_settings_name_the_field() -> None:
    pattern = r"(?s)telemetry.*'protocol'.*grpc.*http/protobuf"
    with pytest.raises(CallbackConfigError, match=pattern):
        TelemetrySettings.resolve({"protocol": "udp"}, {})
    with pytest.raises(CallbackConfigError, match=r"(?s)'endpiont'"):
        RayServeLLMCallback(llm_config=None, ctx_kwargs={}, telemetry={"endpiont": "x"})


def test_installed_provider_is_reused_and_never_replaced() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider  # as if Ray Serve / vLLM / the user had installed it
    try:
        cb = AsyncHooks(llm_config=None, ctx_kwargs={}, telemetry={"endpoint": "http://x:1"})
        cb.run_callback_sync("on_before_download_model_files_distributed")
        names = [s.name for s in exporter.get_finished_spans()]
        assert catalog.SPAN_HOOK_PREFIX + "on_before_download_model_files_distributed" in names
        assert trace.get_tracer_provider() is provider
        assert get_telemetry(cb.telemetry_settings).tracer_provider is provider
    finally:
        trace._TRACER_PROVIDER = previous


def test_private_provider_does_not_take_the_global_slot() -> None:
    before = trace.get_tracer_provider()
    cb = AsyncHooks(llm_config=None, ctx_kwargs={}, telemetry={"traces_file": "/dev/null"})
    cb.run_callback_sync("on_before_download_model_files_distributed")
    assert trace.get_tracer_provider() is before


def test_disabled_sdk_records_nothing() -> None:
    cb = AsyncHooks(llm_config=None, ctx_kwargs={}, telemetry={"enabled": False})
    cb.run_callback_sync("on_before_download_model_files_distributed")
    assert cb.ran
    tel = get_telemetry(cb.telemetry_settings)
    assert not tel.backends
    assert not tel.tracer.start_span("x").is_recording()


def test_async_hook_via_sync_path_inside_running_loop_fixed() -> None:
    """Ray's own run_callback_sync drops the coroutine when a loop runs; ours runs it."""

    class RayOnly(CallbackBase):  # type: ignore[misc]
        async def on_before_download_model_files_distributed(self) -> None:
            self.ran = True

    ours = AsyncHooks(llm_config=None, ctx_kwargs={}, raise_error_on_callback=True)
    rays = RayOnly(llm_config=None, ctx_kwargs={}, raise_error_on_callback=True)

    async def inside_loop() -> None:
        ours.run_callback_sync("on_before_download_model_files_distributed")
        with pytest.raises(Exception):  # noqa: B017 - Ray raises a bare Exception
            rays.run_callback_sync("on_before_download_model_files_distributed")

    asyncio.run(inside_loop())
    assert ours.ran is True
    assert not hasattr(rays, "ran")


def test_pickle_drops_telemetry_and_carries_trace_context(tmp_path: Path) -> None:
    cb = AsyncHooks(llm_config=None, ctx_kwargs={}, telemetry={"traces_file": str(tmp_path / "s")})
    asyncio.run(cb.run_callback("on_before_node_init"))
    assert cb._local is not None and cb.trace_carrier.get("traceparent")
    state = cb.__getstate__()
    assert state["_local"] is None
    clone = pickle.loads(pickle.dumps(cb))
    assert clone._local is None
    assert not hasattr(clone, "unpickled_here")  # deferred until ctx is read ...
    _ = clone.ctx
    assert clone.unpickled_here is True  # ... which Ray does before using it
    assert clone.trace_carrier == cb.trace_carrier
    clone.run_callback_sync("on_before_download_model_files_distributed")
    assert clone._local is not None  # rebuilt lazily on this side


def test_embedded_file_sink_writes_otlp_json(tmp_path: Path) -> None:
    path = tmp_path / "out" / "spans.jsonl"
    cb = AsyncHooks(llm_config=None, ctx_kwargs={}, telemetry={"traces_file": str(path)})
    asyncio.run(cb.run_callback("on_before_node_init"))
    asyncio.run(cb.run_callback("on_after_node_init"))
    get_telemetry(cb.telemetry_settings).force_flush(5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    spans = [
        span
        for line in lines
        for rs in line["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
    ]
    names = {s["name"] for s in spans}
    assert catalog.SPAN_STARTUP in names
    assert all(len(s["traceId"]) == 32 and int(s["traceId"], 16) for s in spans)


def test_prometheus_port_binds_loopback_with_exemplars() -> None:
    cb = AsyncHooks(
        llm_config=None, ctx_kwargs={},
        telemetry={"metrics_backend": "prometheus", "prometheus_port": 0,
                   "traces_file": "/dev/null"},
    )
    cb.run_callback_sync("on_before_download_model_files_distributed")
    tel = get_telemetry(cb.telemetry_settings)
    assert tel.prometheus_port
    req = urllib.request.Request(
        f"http://127.0.0.1:{tel.prometheus_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    assert "llm_callback_hook_calls_total{" in text
    bucket = next(
        line for line in text.splitlines()
        if line.startswith("llm_callback_hook_duration_seconds_bucket") and "trace_id" in line
    )
    assert 'hook="on_before_download_model_files_distributed"' in text
    exemplar = bucket.split(" # ", 1)[1]
    assert 'trace_id="' in exemplar and 'span_id="' in exemplar


def test_otlp_headers_are_sent_but_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    with OtlpHttpReceiver() as rx:
        cb = AsyncHooks(
            llm_config=None, ctx_kwargs={},
            telemetry={"endpoint": rx.endpoint, "headers": {"authorization": "Bearer t0psecret"},
                       "schedule_delay_ms": 50, "otlp_metrics": False},
        )
        with caplog.at_level(logging.DEBUG):
            cb.run_callback_sync("on_before_download_model_files_distributed")
            spans = rx.wait_for_spans(timeout=10)
        assert any(h.get("authorization") == "Bearer t0psecret" for h in rx.headers_seen())
        for span in spans:
            assert "t0psecret" not in json.dumps(span.attributes, default=str)
            assert "t0psecret" not in json.dumps(span.resource_attributes, default=str)
    assert "t0psecret" not in caplog.text


def test_unknown_hook_keeps_rays_error() -> None:
    cb = AsyncHooks(llm_config=None, ctx_kwargs={})
    with pytest.raises(AttributeError, match="does not have method 'on_nothing'"):
        cb.run_callback_sync("on_nothing")


def test_log_policy_hook_error_logs_no_message_when_messages_are_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ray's own log-policy line carried the exception message whatever the setting."""
    from llm_otel_callbacks import RayServeLLMCallback

    class Leaky(RayServeLLMCallback):
        def on_before_node_init(self) -> None:
            raise RuntimeError("token=sk-planted-77")

    for record, shown in ((False, False), (True, True)):
        caplog.clear()
        cb = Leaky(llm_config=None, ctx_kwargs={}, raise_error_on_callback=False,
                   telemetry={"record_exception_messages": record, "metrics_backend": "none"})
        asyncio.run(cb.run_callback("on_before_node_init"))
        assert "Error running callback method 'on_before_node_init'" in caplog.text
        assert ("sk-planted-77" in caplog.text) is shown
        assert shown or "RuntimeError" in caplog.text
