"""Ray gauges stay visible while their value holds (real Ray, real scrape); Ray's metrics are
recorded off the caller's thread.

Ray 2.60's metrics agent evicts a gauge observation not refreshed within two report intervals
(``open_telemetry_metric_recorder.py``). A replica whose model download takes ten minutes sets
``llm_callback_replicas_starting`` once, so the dashboards rely on the worker re-reporting a
live gauge every interval without a new ``set``. It does (measured here); this guards that
assumption with Ray's report interval at 1 s (TTL 2 s), over several TTLs after one ``add``.

Ray's record releases the GIL around its C++ call, so on a replica's busy event loop each call
could hand the GIL away; the default Ray backend therefore goes through the metric pipe, whose
worker thread makes the calls (``telemetry/metric_pipe.py``).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import ray

from llm_otel_callbacks import catalog
from tests._support.ray_env import scrape, select, wait_for_metric

STARTING = catalog.REPLICAS_STARTING.exposed_name(ray=True)
DURATION_COUNT = catalog.HOOK_DURATION.exposed_name(ray=True) + "_count"
TTL_S = 2.0  # two report intervals of FAST_METRICS_SYSTEM_CONFIG (1 s)


@ray.remote(num_cpus=0)
class GaugeHolder:
    """Holds a gauge value, as Timing does for a replica between its startup hooks."""

    def add(self, model: str, delta: float) -> None:
        from llm_otel_callbacks.telemetry import TelemetrySettings, get_telemetry

        tel = get_telemetry(TelemetrySettings.resolve({}, environ={}))
        assert [b.name for b in tel.backends] == ["ray"]
        tel.recorder(catalog.REPLICAS_STARTING).add((model,), delta)


@ray.remote(num_cpus=0)
class HistogramCaller:
    """Observes one hook duration as a hook's caller does; reports the threads that called
    Ray's metric for it."""

    def observe(self, model: str) -> dict[str, Any]:
        import threading

        from llm_otel_callbacks.telemetry import TelemetrySettings, get_telemetry
        from llm_otel_callbacks.telemetry import metrics as backends

        tel = get_telemetry(TelemetrySettings.resolve({}, environ={}))
        callers: list[int] = []
        original = backends._RayRecorder.record

        def spy(self: Any, labels: Any, value: float, exemplar: Any = None) -> None:
            callers.append(threading.get_ident())
            original(self, labels, value, exemplar)

        backends._RayRecorder.record = spy  # type: ignore[method-assign]
        try:
            tel.recorder(catalog.HOOK_DURATION).record(
                (model, "on_before_node_init", "Probe", catalog.OUTCOME_OK), 0.25)
            deadline = time.monotonic() + 10
            while not callers and time.monotonic() < deadline:  # the worker's next tick
                time.sleep(0.05)
        finally:
            backends._RayRecorder.record = original  # type: ignore[method-assign]
        return {"backends": [b.name for b in tel.backends], "piped": tel.metric_pipe is not None,
                "hook_thread": threading.get_ident(), "ray_callers": callers}


def test_ray_metrics_are_recorded_by_the_pipe_worker_not_the_hooks_thread(
    ray_local: Any,
) -> None:
    caller = HistogramCaller.remote()  # type: ignore[attr-defined]
    seen = ray.get(caller.observe.remote("piped"))
    assert seen["backends"] == ["ray"] and seen["piped"] is True
    assert len(seen["ray_callers"]) == 1, seen
    assert seen["ray_callers"][0] != seen["hook_thread"], seen
    # And the observation reaches Ray's metrics, once.
    samples = wait_for_metric(
        ray_local.metrics_url, DURATION_COUNT,
        lambda found: bool(select(found, model="piped")), timeout=30)
    assert [v for _, v in select(samples, model="piped")] == [1.0]
    ray.kill(caller)


def _values(url: str, model: str) -> list[float]:
    return [v for _, v in select(scrape(url).get(STARTING, []), model=model)]


def _watch(url: str, model: str, seconds: float) -> list[list[float]]:
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(_values(url, model))
        time.sleep(0.5)
    return seen


def test_a_gauge_set_once_stays_while_its_value_holds(ray_local: Any) -> None:
    holder = GaugeHolder.remote()  # type: ignore[attr-defined]
    ray.get(holder.add.remote("held", 1))
    deadline = time.monotonic() + 30
    while _values(ray_local.metrics_url, "held") != [1.0]:
        assert time.monotonic() < deadline, "the gauge never appeared"
        time.sleep(0.5)
    # Six TTLs without a new add: every scrape still shows the value.
    seen = _watch(ray_local.metrics_url, "held", 6 * TTL_S)
    assert all(v == [1.0] for v in seen), seen

    # Back to 0 (startup over): the series shows 0, not a stale 1.
    ray.get(holder.add.remote("held", -1))
    deadline = time.monotonic() + 30
    while _values(ray_local.metrics_url, "held") != [0.0]:
        assert time.monotonic() < deadline, _values(ray_local.metrics_url, "held")
        time.sleep(0.5)
    seen = _watch(ray_local.metrics_url, "held", 3 * TTL_S)
    assert all(v == [0.0] for v in seen), seen
    ray.kill(holder)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    from llm_otel_callbacks.telemetry import reset_telemetry

    reset_telemetry()
