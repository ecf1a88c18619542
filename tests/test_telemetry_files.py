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


