"""Per-hook cost of a wrapped hook against the bare telemetry primitives, in one run.

Both sides use the same tracer provider (a real SDK provider with a batch processor and a
discarding exporter) and the same prometheus_client metrics. The bare side is what a careful
hand-written instrumentation would do for one call: start a span with the same attributes,
make it current, call the hook, set the outcome, end the span, observe the histogram and
increment the counter (label children pre-bound). The wrapped side is
``callback.run_callback_sync(hook)`` on a ``RayServeLLMCallback``.

Run: ``python benchmarks/hook_overhead.py [--iterations N] [--rounds R]``. Goal: ratio <= 1.2.

``--collectors`` adds the collector-down run: the same no-op hook on three callbacks that
export for real (OTLP/HTTP spans and metrics, our exporter stack) to a healthy collector, a
closed port and a collector that accepts and never answers, timed call by call in
interleaved rounds of one process. Goal: per-call cost unchanged (ratios ~1, p99 within
1 ms, no call stalled). ``benchmarks/collector_down.py`` measures the full collections and
the shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from llm_otel_callbacks import RayServeLLMCallback, catalog
from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry


class _Discard(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NoopSync(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        return None


class NoopAsync(RayServeLLMCallback):
    async def on_before_node_init(self) -> None:
        return None


def setup_provider() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=1 << 16))
    trace.set_tracer_provider(provider)
    return provider


def _per_call(fn: Callable[[], Any], iterations: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def bare_call(cb: RayServeLLMCallback, hook: str) -> Callable[[], None]:
    """The same primitives, written by hand, for the same hook."""
    tel = get_telemetry(cb.telemetry_settings)
    tracer = tel.tracer
    import prometheus_client as pc

    # The very metric objects the wrapper uses, children bound once.
    registry = pc.REGISTRY
    hist = registry._names_to_collectors[catalog.HOOK_DURATION.name]
    calls = registry._names_to_collectors[catalog.HOOK_CALLS.name + "_total"]
    labels = (cb.model_id, hook, cb.callback_name, catalog.OUTCOME_OK)
    hist_child = hist.labels(*labels)
    calls_child = calls.labels(*labels)
    attrs = {catalog.A_HOOK: hook, catalog.A_CLASS: "bench", catalog.A_CALLBACK: "bench",
             catalog.A_MODEL: cb.model_id, catalog.A_PID: 1}
    method = getattr(cb, hook)
    name = catalog.SPAN_HOOK_PREFIX + hook

    def call() -> None:
        span = tracer.start_span(name, attributes=attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        t0 = time.perf_counter()
        method()
        elapsed = time.perf_counter() - t0
        otel_context.detach(token)
        span.set_attribute(catalog.A_OUTCOME, catalog.OUTCOME_OK)
        trace_id = format(span.get_span_context().trace_id, "032x")
        span.end()
        hist_child.observe(elapsed, exemplar={"trace_id": trace_id})
        calls_child.inc()

    return call


def measure(iterations: int, rounds: int) -> dict[str, Any]:
    reset_telemetry()
    provider = setup_provider()
    settings = {"metrics_backend": "prometheus"}
    cb = NoopSync(llm_config=None, ctx_kwargs={}, telemetry=settings)
    hook = "on_before_node_init"
    wrapped = lambda: cb.run_callback_sync(hook)  # noqa: E731
    wrapped()  # build telemetry and metric children before timing
    bare = bare_call(cb, hook)
    bare()

    acb = NoopAsync(llm_config=None, ctx_kwargs={}, telemetry=settings)
    loop = asyncio.new_event_loop()

    async def many_async(n: int) -> None:
        for _ in range(n):
            await acb.run_callback(hook)

    results: dict[str, list[float]] = {"wrapped": [], "bare": [], "wrapped_async": []}
    for _ in range(rounds):  # interleaved, so drift hits both sides alike
        results["bare"].append(_per_call(bare, iterations))
        results["wrapped"].append(_per_call(wrapped, iterations))
        t0 = time.perf_counter()
        loop.run_until_complete(many_async(iterations))
        results["wrapped_async"].append((time.perf_counter() - t0) / iterations)
    loop.close()
    provider.shutdown()
    best = {k: min(v) for k, v in results.items()}
    return {
        "iterations": iterations,
        "rounds": rounds,
        "bare_us": round(best["bare"] * 1e6, 2),
        "wrapped_sync_us": round(best["wrapped"] * 1e6, 2),
        "wrapped_async_us": round(best["wrapped_async"] * 1e6, 2),
        "ratio_sync": round(best["wrapped"] / best["bare"], 3),
    }


COLLECTOR_MODES = ("healthy", "closed", "hang")


def measure_collectors(iterations: int, rounds: int) -> dict[str, Any]:
    """Per-call cost of one no-op hook with the collector healthy, down, and hanging."""
    import contextlib
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests._support.fault_collector import FaultCollector

    hook = "on_before_node_init"
    per_call: dict[str, list[float]] = {mode: [] for mode in COLLECTOR_MODES}
    round_means: dict[str, list[float]] = {mode: [] for mode in COLLECTOR_MODES}
    with contextlib.ExitStack() as stack:
        callbacks = {}
        for mode in COLLECTOR_MODES:
            collector = stack.enter_context(FaultCollector(mode))
            cb = NoopSync(llm_config=None, ctx_kwargs={}, telemetry={
                "endpoint": collector.endpoint, "metrics_backend": "prometheus",
                # Our own pipeline, not the discarding provider setup_provider() installs.
                "reuse_installed_provider": False, "shutdown_timeout_s": 1.0})
            cb.run_callback_sync(hook)
            callbacks[mode] = cb
        clock = time.perf_counter
        # Full collections, charged to the mode whose calls were running. (The healthy
        # collector's in-process receiver keeps every span it decodes: that growth, not a
        # fault, is what triggers them here; collector_down.py measures them per process.)
        full_gcs: dict[str, int] = {mode: 0 for mode in COLLECTOR_MODES}
        current = ["healthy"]

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start" and info["generation"] == 2:
                full_gcs[current[0]] += 1

        gc.callbacks.append(on_gc)
        for _ in range(rounds):  # interleaved, so drift hits every mode alike
            for mode, cb in callbacks.items():
                current[0] = mode
                run = cb.run_callback_sync
                samples = per_call[mode]
                t_round = clock()
                for i in range(iterations):
                    t0 = clock()
                    run(hook)
                    samples.append(clock() - t0)
                    if i % 10 == 9:
                        time.sleep(0.0005)  # let the export worker run, as between hooks
                round_means[mode].append((clock() - t_round) / iterations)
        gc.callbacks.remove(on_gc)
        for cb in callbacks.values():
            get_telemetry(cb.telemetry_settings).shutdown()
    out: dict[str, Any] = {"iterations_per_round": iterations, "rounds": rounds}
    for mode, samples in per_call.items():
        ordered = sorted(samples)
        out[mode] = {
            "median_us": round(statistics.median(ordered) * 1e6, 1),
            "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 1),
            "max_us": round(ordered[-1] * 1e6, 1),
            "calls_over_1ms": sum(1 for x in ordered if x > 1e-3),
            "full_gcs": full_gcs[mode],
        }
    base = out["healthy"]
    for mode in COLLECTOR_MODES[1:]:
        out[f"ratio_median_{mode}"] = round(out[mode]["median_us"] / base["median_us"], 3)
        out[f"p99_delta_{mode}_us"] = round(out[mode]["p99_us"] - base["p99_us"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--collectors", action="store_true",
                        help="also run the collector-down comparison (healthy, closed, hang)")
    args = parser.parse_args()
    result = measure(args.iterations, args.rounds)
    print(json.dumps(result, indent=2))
    print(
        f"wrapped hook {result['wrapped_sync_us']} us vs bare primitives {result['bare_us']} us"
        f" -> ratio {result['ratio_sync']} (goal <= 1.2)"
    )
    if args.collectors:
        down = measure_collectors(max(1, args.iterations // 4), args.rounds)
        print(json.dumps(down, indent=2))
        for mode in COLLECTOR_MODES[1:]:
            print(
                f"collector {mode}: median {down[mode]['median_us']} us vs healthy "
                f"{down['healthy']['median_us']} us (ratio {down[f'ratio_median_{mode}']}), "
                f"p99 {down[f'p99_delta_{mode}_us']:+} us, max {down[mode]['max_us']} us "
                f"(full GCs in its calls: {down[mode]['full_gcs']})"
            )


if __name__ == "__main__":
    main()
