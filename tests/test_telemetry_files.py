"""The traces file and the endpoint settings keep secrets in: 0600, no symlinks, an absolute
path fixed at configuration, a size cap; no credentials in endpoint URLs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult

from llm_otel_callbacks import CallbackConfigError
from llm_otel_callbacks.telemetry import TelemetrySettings
from llm_otel_callbacks.telemetry.export import OtlpJsonFileSpanExporter
from llm_otel_callbacks.telemetry.providers import Telemetry


def _settings(path: str, **extra: object) -> TelemetrySettings:
    return TelemetrySettings.resolve(
        {"traces_file": path, "metrics_backend": "none", "schedule_delay_ms": 10, **extra},
        environ={},
    )


def _one_span(tel: Telemetry) -> None:
    tel.tracer.start_span("probe").end()
    tel.force_flush(5)


def test_traces_file_is_private_and_fixed_at_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured, elsewhere = tmp_path / "configured", tmp_path / "elsewhere"
    configured.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(configured)
    settings = _settings("spans/out.jsonl")
    assert settings.traces_file == str(configured / "spans" / "out.jsonl")
    monkeypatch.chdir(elsewhere)  # a worker starting in another folder
    tel = Telemetry(settings)
    try:
        _one_span(tel)
    finally:
        tel.shutdown()
    written = configured / "spans" / "out.jsonl"
    assert written.read_text().count("\n") == 1
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE(written.parent.stat().st_mode) & 0o077 == 0
    assert not (elsewhere / "spans").exists()


def test_traces_file_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "spans.jsonl"
    link.symlink_to(victim)
    exporter = OtlpJsonFileSpanExporter(str(link))
    span = TracerProvider().get_tracer("t").start_span("probe")
    span.end()
    with pytest.raises(OSError):  # the guard around it counts the batch as dropped
        exporter.export([span])  # type: ignore[list-item]
    assert victim.read_text() == "precious\n"


def test_traces_file_stops_at_its_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = OtlpJsonFileSpanExporter(str(path), max_bytes=4000)
    tracer = TracerProvider().get_tracer("t")
    results = []
    for _ in range(40):
        span = tracer.start_span("probe")
        span.end()
        results.append(exporter.export([span]))  # type: ignore[list-item]
    assert SpanExportResult.SUCCESS in results and SpanExportResult.FAILURE in results
    assert 0 < path.stat().st_size <= 4000
    assert _settings(str(path)).traces_file_max_mib == 256


@pytest.mark.parametrize("field,variable", [
    ("endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ("metrics_endpoint", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
])
def test_credentials_in_an_endpoint_url_are_refused_unquoted(field: str, variable: str) -> None:
    url = "https://collector-user:hunter2-secret@otel.example:4318"
    for kwargs, environ in (({field: url}, {}), (None, {variable: url})):
        with pytest.raises(CallbackConfigError, match=f"{field}.*credentials") as info:
            TelemetrySettings.resolve(kwargs, environ=environ)
        assert "hunter2" not in str(info.value) and "collector-user" not in str(info.value)
    ok = TelemetrySettings.resolve({field: "https://otel.example:4318"}, environ={})
    assert getattr(ok, field) == "https://otel.example:4318"


def test_settings_never_show_header_values() -> None:
    settings = TelemetrySettings.resolve(
        {"headers": {"Authorization": "Bearer hunter2-secret"}}, environ={})
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())




# --- one bad sink never silences the rest; an installed provider says what it ignores ----------


def test_one_bad_sink_leaves_the_others_exporting(tmp_path: Path) -> None:
    """An unwritable traces_file and a taken prometheus_port (two processes on one node) used
    to disable OTLP traces and metrics as well. Now each is dropped alone, and counted."""
    import socket

    from llm_otel_callbacks import catalog
    from tests._support.otlp_receiver import OtlpHttpReceiver

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    with OtlpHttpReceiver() as rx:
        settings = TelemetrySettings.resolve({
            "endpoint": rx.endpoint, "traces_file": str(blocker / "spans.jsonl"),
            "metrics_backend": "prometheus", "prometheus_port": taken.getsockname()[1],
            "otlp_metrics": True, "metric_export_interval_ms": 200, "schedule_delay_ms": 10,
        }, environ={})
        tel = Telemetry(settings)
        try:
            assert sorted(tel.failed_sinks) == [("metrics", "prometheus"),
                                                ("traces", "traces_file")]
            tel.tracer.start_span("still-exported").end()
            tel.force_flush(5)
            assert rx.wait_for_span("still-exported", timeout=10)
            name = catalog.EXPORT_FAILURES.name
            metrics = rx.wait_for_metric(name, timeout=10)
            reasons = {(p["attributes"]["signal"], p["attributes"]["reason"])
                       for m in metrics for p in m.points}
            assert {("traces", "sink_failed"), ("metrics", "sink_failed")} <= reasons
        finally:
            tel.shutdown()
            taken.close()


def test_an_installed_provider_warns_once_that_our_sinks_are_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from llm_otel_callbacks.telemetry import providers

    installed = TracerProvider()
    monkeypatch.setattr(providers.trace, "get_tracer_provider", lambda: installed)
    settings = _settings(str(tmp_path / "spans.jsonl"), endpoint="http://127.0.0.1:9")
    caplog.set_level("WARNING")
    for _ in range(2):
        tel = Telemetry(settings)
        assert tel.tracer_provider is installed
        tel.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "already installed" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "endpoint and traces_file" in warnings[0]
    assert "reuse_installed_provider: false" in warnings[0]
    off = _settings(str(tmp_path / "own.jsonl"), reuse_installed_provider=False)
    tel = Telemetry(off)
    try:
        assert tel.tracer_provider is not installed
    finally:
        tel.shutdown()


@pytest.mark.parametrize("record_messages", [True, False])
def test_engine_start_span_status_obeys_record_exception_messages(record_messages: bool) -> None:
    """The engine-start span's status carried the engine error's full message whatever the
    setting."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llm_otel_callbacks import Composite
    from llm_otel_callbacks.serve._engine_start import EngineStart

    callback = Composite(callbacks=[], telemetry={"record_exception_messages": record_messages,
                                                  "metrics_backend": "none"})
    tel = Telemetry(_settings("/dev/null"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        start = EngineStart(callback, "m", tel)
        start.span = provider.get_tracer("t").start_span("engine start")
        start._end(RuntimeError("could not reach https://hub.example/?token=hf_PLANTED"))
        (span,) = exporter.get_finished_spans()
        assert span.status.description is not None
        assert span.status.description.startswith("RuntimeError")
        assert ("hf_PLANTED" in span.status.description) is record_messages
    finally:
        tel.shutdown()
