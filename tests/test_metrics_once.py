"""Each measurement is recorded once: by default into exactly one metrics backend; OTLP only
when asked (``OTEL_METRICS_EXPORTER=otlp``), and then fanned out at export, still once per
backend. OTLP histograms carry the hook span as exemplar.

Outside Ray the local backend is prometheus_client (the process's default registry), read
here with ``get_sample_value``; OTLP goes to a real OTLP/HTTP receiver.
"""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
import pytest

from llm_otel_callbacks import RayServeLLMCallback, catalog
from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry
from tests._support.otlp_receiver import OtlpHttpReceiver

HOOK = "on_before_node_init"


class Noop(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        return None


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    reset_telemetry()
    yield
    reset_telemetry()


def _labels(cb: RayServeLLMCallback) -> dict[str, str]:
    return {"model": cb.model_id, "hook": HOOK, "callback": cb.callback_name,
            "outcome": catalog.OUTCOME_OK}


def _prom_count(cb: RayServeLLMCallback) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        catalog.HOOK_DURATION.name + "_count", _labels(cb))
    return value or 0.0


def _callback(rx: OtlpHttpReceiver) -> Noop:
    # The README's configuration: an OTLP endpoint, our own provider; fast schedules.
    return Noop(llm_config=None, ctx_kwargs={}, telemetry={
        "endpoint": rx.endpoint, "schedule_delay_ms": 50, "metric_export_interval_ms": 100,
        "metrics_backend": "prometheus"})


def test_default_hook_observation_reaches_exactly_one_backend() -> None:
    with OtlpHttpReceiver() as rx:
        cb = _callback(rx)
        before = _prom_count(cb)
        cb.run_callback_sync(HOOK)
        tel = get_telemetry(cb.telemetry_settings)
        tel.force_flush(10)
        rx.wait_for_span(catalog.SPAN_HOOK_PREFIX + HOOK, timeout=10)  # the endpoint works

        assert [b.name for b in tel.backends] == ["prometheus"]
        assert tel.metric_pipe is None
        assert _prom_count(cb) == before + 1
        assert rx.requests("/v1/metrics") == []
        assert rx.metric_names() == set()


def test_otel_metrics_exporter_otlp_adds_otlp_recorded_once_with_exemplar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    with OtlpHttpReceiver() as rx:
        cb = _callback(rx)
        assert cb.telemetry_settings.otlp_metrics is True
        before = _prom_count(cb)
        cb.run_callback_sync(HOOK)
        tel = get_telemetry(cb.telemetry_settings)
        tel.force_flush(10)
        span = rx.wait_for_span(catalog.SPAN_HOOK_PREFIX + HOOK, timeout=10)

        assert [b.name for b in tel.backends] == ["prometheus", "otlp"]
        assert tel.metric_pipe is not None  # one record, fanned out to both
        # Still one observation in the local backend: not recorded twice.
        assert _prom_count(cb) == before + 1
        metrics = rx.wait_for_metric(catalog.HOOK_DURATION.name, timeout=10)
        points = [p for m in metrics for p in m.points
                  if p["attributes"].get("hook") == HOOK and p["count"] > 0]
        assert points, metrics
        assert points[-1]["count"] == 1
        exemplars = points[-1]["exemplars"]
        assert [(e["trace_id"], e["span_id"]) for e in exemplars] == [
            (span.trace_id, span.span_id)
        ]


def test_otlp_metrics_setting_off_by_default_and_env_none_keeps_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llm_otel_callbacks import TelemetrySettings

    assert TelemetrySettings.resolve({"endpoint": "http://x:4318"}, environ={}) \
        .exports_otlp_metrics is False
    on = TelemetrySettings.resolve({"endpoint": "http://x:4318"},
                                   environ={"OTEL_METRICS_EXPORTER": "otlp"})
    assert on.exports_otlp_metrics is True
    off = TelemetrySettings.resolve({"endpoint": "http://x:4318", "otlp_metrics": True},
                                    environ={"OTEL_METRICS_EXPORTER": "none"})
    assert off.exports_otlp_metrics is True  # the kwarg wins over the variable
    assert TelemetrySettings.resolve(
        {"endpoint": "http://x:4318"}, environ={"OTEL_METRICS_EXPORTER": "none"}
    ).exports_otlp_metrics is False
