"""The SIGTERM flush (llm_otel_callbacks._sigterm) without Ray: real telemetry, real OTLP/HTTP
export to the in-test receiver, a bound that holds when the collector hangs. The Ray side
(a replica killed during node init) is tests/test_faults_serve.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llm_otel_callbacks import RayServeLLMCallback, TelemetrySettings, _sigterm, catalog
from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry
from tests._support.otlp_receiver import OtlpHttpReceiver


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    reset_telemetry()
    _sigterm._WATCHED.clear()
    yield
    reset_telemetry()
    _sigterm._WATCHED.clear()


class Hooks(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        pass


def test_ended_and_open_startup_spans_leave_on_flush(otlp_receiver: OtlpHttpReceiver) -> None:
    # A schedule delay far beyond the test: only the flush can deliver the spans.
    cb = Hooks(telemetry={"endpoint": otlp_receiver.endpoint, "schedule_delay_ms": 600_000,
                          "otlp_metrics": False, "metrics_backend": "none"})
    cb.run_callback_sync("on_before_node_init")  # hook span ends; startup span stays open
    time.sleep(0.3)
    assert not otlp_receiver.spans()

    waited = _sigterm.flush_now("process received SIGTERM before the replica finished starting")

    spans = otlp_receiver.wait_for_spans(
        lambda ss: {catalog.SPAN_STARTUP, catalog.SPAN_HOOK_PREFIX + "on_before_node_init"}
        <= {s.name for s in ss}, timeout=2)
    startup = next(s for s in spans if s.name == catalog.SPAN_STARTUP)
    assert startup.status_code == "STATUS_CODE_ERROR" and "SIGTERM" in startup.status_message
    assert waited < 5.0


class _Hanging:
    """Telemetry whose flush never returns in time (a collector that does not answer)."""

    def __init__(self, timeout_s: float) -> None:
        self.settings = TelemetrySettings(shutdown_timeout_s=timeout_s)
        self.release = threading.Event()

    def force_flush(self, timeout_s: float | None = None) -> None:
        self.release.wait(30)


def test_flush_never_waits_past_the_bound() -> None:
    hanging = _Hanging(0.5)
    _sigterm.watch(hanging)
    try:
        t0 = time.monotonic()
        _sigterm.flush_now("test")
        assert time.monotonic() - t0 < 0.5 + 0.3
    finally:
        hanging.release.set()


def test_flush_bound_with_a_collector_that_never_answers() -> None:
    # Accepts connections and never replies.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        tel = get_telemetry(TelemetrySettings.resolve(
            {"endpoint": endpoint, "schedule_delay_ms": 600_000, "shutdown_timeout_s": 1.0,
             "export_timeout_s": 10, "otlp_metrics": False, "metrics_backend": "none"}))
        _sigterm.watch(tel)
        with tel.tracer.start_as_current_span("x"):
            pass
        t0 = time.monotonic()
        _sigterm.flush_now("test")
        assert time.monotonic() - t0 < 1.0 + 0.3
    finally:
        server.close()


def test_outside_a_ray_worker_nothing_is_wrapped() -> None:
    from ray._private import worker as ray_worker

    name = "raise_sys_exit_with_custom_error_message"  # what Ray's SIGTERM handler calls
    before = getattr(ray_worker, name)
    _sigterm.watch(get_telemetry(TelemetrySettings.resolve({"metrics_backend": "none"})))
    assert getattr(ray_worker, name) is before
    assert not hasattr(before, "__wrapped__")


def test_disabled_telemetry_is_not_watched() -> None:
    tel: Any = get_telemetry(TelemetrySettings.resolve({"enabled": False}))
    _sigterm.watch(tel)
    assert tel not in _sigterm._WATCHED
