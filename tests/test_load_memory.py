"""Load and memory: 100,000 hook calls through a Composite of five children (20,000
dispatches of ``on_before_node_init``, each calling all five), in one process, on the two
real telemetry paths, each with the prometheus_client metrics backend:

* ``installed_provider``: an SDK TracerProvider the application installed, with the SDK's
  BatchSpanProcessor (its exporter counts and drops the batches: serializing 120,000 spans
  would measure the exporter, not us); ours reuses it.
* ``own_provider_collector_down``: the provider this package builds (its own span queue and
  OTLP/HTTP exporter) pointed at a port nobody listens on: every span is dropped and counted,
  and nothing may pile up.

After a warm-up (every span, metric series and memo exists once), resident memory must
stay flat and the number of threads must not grow, although one child has a timeout (so
each of its calls runs on a thread of its own) and one changes the ctx on every call (a
change-log event and a metric each time).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from llm_otel_callbacks import Composite, RayServeLLMCallback
from llm_otel_callbacks.demo.ports import free_port
from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry
from tests._support.fault_collector import FaultCollector, dropped_spans

CHILD_CALLS = 100_000
CHILDREN = 5
CALLS = CHILD_CALLS // CHILDREN  # composite dispatches
WARMUP = 1_000
#: Allowed RSS growth over the run. What must not grow is per call: a leak of 64 bytes
#: per child call would be 6 MiB here, one span kept per call about 150 MiB.
#: The rest is allocator noise: the batch processor's queue (up to 2,048 spans) fills
#: and drains, and pymalloc arenas are not returned to the OS at once.
MAX_GROWTH_MIB = 16.0
HOOK = "on_before_node_init"
M = "tests.test_load_memory."


class AsyncChild(RayServeLLMCallback):
    async def on_before_node_init(self) -> None:
        return None


class CountingChild(RayServeLLMCallback):
    """Changes the ctx in place on every call: a ctx_change event and metric each time."""

    def on_before_node_init(self) -> None:
        slot = self.ctx.custom_data.setdefault("counter", {"n": 0})
        slot["n"] += 1


class SeedChild:
    def on_before_init(self, ctx: Any) -> None:
        return None


def phase_fn(phase: str, llm_config: Any, data: dict[str, Any]) -> None:
    return None


class _Drop(SpanExporter):
    """Receives every batch the SDK exports, counts it, keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


@dataclass
class Setup:
    path: str
    composite: Composite
    spans_delivered: Callable[[], int]  # spans that reached the exporter
    spans_dropped: Callable[[], float]  # spans counted as dropped (our metric)


def _children() -> list[dict[str, Any]]:
    return [
        {"callback_class": "llm_otel_callbacks.testing.NoopCallback", "name": "noop"},
        {"callback_class": M + "AsyncChild", "name": "async"},
        {"callback_class": M + "CountingChild", "name": "counting", "timeout_s": 30},
        {"callback_class": M + "SeedChild", "name": "seed"},
        {"callback_class": M + "phase_fn", "name": "phase"},
    ]


@pytest.fixture(params=["installed_provider", "own_provider_collector_down"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    reset_telemetry()
    if request.param == "installed_provider":
        # As in a replica where Ray Serve or vLLM installed one. Put back afterwards.
        exporter = _Drop()
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 14))
        previous = trace._TRACER_PROVIDER
        trace._TRACER_PROVIDER = provider
        try:
            cb = Composite(llm_config=None, ctx_kwargs={}, callbacks=_children(),
                           telemetry={"metrics_backend": "prometheus"})
            yield Setup(request.param, cb, lambda: exporter.spans, lambda: 0.0)
        finally:
            trace._TRACER_PROVIDER = previous
            provider.shutdown()
            reset_telemetry()
        return
    with FaultCollector("closed") as collector:
        port = free_port()
        cb = Composite(
            llm_config=None, ctx_kwargs={}, callbacks=_children(),
            telemetry={"endpoint": collector.endpoint, "otlp_metrics": False,
                       "metrics_backend": "prometheus", "prometheus_port": port,
                       "schedule_delay_ms": 100, "shutdown_timeout_s": 1},
        )
        try:
            yield Setup(request.param, cb, lambda: 0,
                        lambda: sum(dropped_spans(port).values()))
        finally:
            reset_telemetry()


def _rss_mib(proc: psutil.Process) -> float:
    gc.collect()
    return float(proc.memory_info().rss) / (1 << 20)


def _dispatch(cb: Composite, calls: int) -> None:
    async def run() -> None:
        for _ in range(calls):
            await cb.run_callback(HOOK)

    asyncio.run(run())


def test_hundred_thousand_hook_calls_keep_memory_and_threads_flat(
    setup: Setup, record_property: Any
) -> None:
    proc = psutil.Process()
    composite = setup.composite
    tel = get_telemetry(composite.telemetry_settings)
    assert isinstance(tel.tracer_provider, TracerProvider), "the SDK provider, not a no-op"
    # The installed provider is reused; otherwise ours, not the installed one.
    assert (tel.tracer_provider is trace._TRACER_PROVIDER) == (setup.path == "installed_provider")
    assert [b.__class__.__name__ for b in tel.backends] == ["PrometheusBackend"]

    # The counter is per process: earlier tests in this process may have dropped spans too.
    dropped_before = setup.spans_dropped()
    _dispatch(composite, WARMUP)
    time.sleep(0.5)  # the batch processor's thread drains what the warm-up queued
    threads_before = threading.active_count()
    idents_before = {t.ident for t in threading.enumerate()}
    rss_before = _rss_mib(proc)

    t0, cpu0 = time.perf_counter(), time.process_time()
    _dispatch(composite, CALLS)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    time.sleep(0.5)
    rss_after = _rss_mib(proc)
    # A timed child's worker thread ends right after its call; give the last one a moment.
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    threads_after = threading.active_count()

    delivered, dropped = setup.spans_delivered(), setup.spans_dropped() - dropped_before
    figures = {
        "path": setup.path,
        "child_hook_calls": CALLS * len(composite.children), "dispatches": CALLS,
        "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1),
        "rss_growth_mib": round(rss_after - rss_before, 2),
        "threads_before": threads_before, "threads_after": threads_after,
        "new_threads": sorted(t.name for t in threading.enumerate()
                              if t.ident not in idents_before),
        "dispatches_per_s": round(CALLS / elapsed),
        "child_calls_per_s": round(CALLS * len(composite.children) / elapsed),
        # CPU seconds of this process (all its threads): what the run costs whatever else
        # the machine is doing; wall seconds depend on that.
        "seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 1),
        "spans_delivered": delivered, "spans_dropped": dropped,
    }
    for key, value in figures.items():
        record_property(key, value)
    print("load:", figures)

    # Every call really went through every child.
    assert len(composite.children) == CHILDREN
    assert composite.ctx.custom_data["counter"]["n"] == WARMUP + CALLS
    spans = (WARMUP + CALLS) * (CHILDREN + 1)
    if setup.path == "installed_provider":
        # The batch queue may drop some under load; most must arrive.
        assert delivered > spans // 2, figures
    else:
        # Nobody listens: (nearly) every span is dropped and counted, none kept. The last
        # batch may still be in the queue or in the one export attempt under way.
        assert spans - 2 * 2048 <= dropped <= spans + 2, figures
    assert threads_after <= threads_before, figures
    assert rss_after - rss_before < MAX_GROWTH_MIB, figures
