"""Per-hook cost of a wrapped hook against the same signals written by hand, in one run.

Each row is one configuration; in each, the two sides alternate in rounds (interleaved, so
drift on a shared machine hits both alike):

* ``wrapped``: ``callback.run_callback_sync(hook)`` on a ``RayServeLLMCallback`` configured as
  the README shows: ``telemetry: {"endpoint": ...}`` (our own provider, OTLP/HTTP to a live
  receiver), default schedules and default metrics backend;
* ``bare``: what a careful hand-written instrumentation does for the same call with the stock
  SDK: one span with the same attributes, made current, exported over OTLP/HTTP by the SDK's
  ``BatchSpanProcessor`` + ``OTLPSpanExporter`` to the same receiver, plus the same two metric
  updates (duration histogram and call counter, label children bound once) in one backend.

Rows: ``outside Ray`` (prometheus_client backend), ``inside a Ray worker`` (Ray's metrics
backend; the row runs in a Ray task), and ``installed provider`` (an SDK tracer provider with
an OTLP exporter installed globally; both sides use it, as ours reuses it).

Each round runs ``--iterations`` calls and then flushes that side's spans (waits for its
export), so a side's figure includes its export work. Reported per call: wall time and the
process's CPU time (all threads: the export thread's encoding and POSTs count). The receiver
runs in its own process. Ratios: of the best round of each side, and the median (and range) of
the rounds' own ratios, each round's two sides having run back to back.

Run: ``python benchmarks/hook_overhead.py [--iterations N] [--rounds R] [--no-ray]``.
Goal: ratio <= 1.2 in every row.

``--collectors`` adds the collector-down run: the same no-op hook on three callbacks that
export for real (OTLP/HTTP spans and metrics, our exporter stack) to a healthy collector, a
closed port and a collector that accepts and never answers, timed call by call in
interleaved rounds of one process. Goal: per-call cost unchanged (ratios ~1, p99 within
1 ms, no call stalled). ``benchmarks/collector_down.py`` measures the full collections and
the shutdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry import trace  # noqa: E402

from llm_otel_callbacks import RayServeLLMCallback, catalog  # noqa: E402
from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry  # noqa: E402

HOOK = "on_before_node_init"
BARE_SPAN = "bare " + HOOK


class NoopSync(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        return None


def _sdk_provider(endpoint: str) -> Any:
    """The stock SDK pipeline a hand-written instrumentation would build."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=endpoint + "/v1/traces")))
    return provider


def _bare_metrics(backend: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """(observe(seconds, trace_id), inc()) in one backend, children/tags bound once."""
    spec_h, spec_c = catalog.HOOK_DURATION, catalog.HOOK_CALLS
    labels = ("bench", HOOK, "bare", catalog.OUTCOME_OK)
    if backend == "ray":
        from ray.util import metrics as ray_metrics

        tags = dict(zip(spec_h.labels, labels, strict=True))
        hist = ray_metrics.Histogram("bare_" + spec_h.name, boundaries=list(spec_h.buckets or ()),
                                     tag_keys=spec_h.labels)
        calls = ray_metrics.Counter("bare_" + spec_c.name, tag_keys=spec_c.labels)
        return (lambda v, _t: hist.observe(v, tags=tags)), (lambda: calls.inc(1.0, tags=tags))
    import prometheus_client as pc

    registry = pc.CollectorRegistry()
    h = pc.Histogram(spec_h.name, "d", list(spec_h.labels), registry=registry,
                     buckets=list(spec_h.buckets or pc.Histogram.DEFAULT_BUCKETS)).labels(*labels)
    c = pc.Counter(spec_c.name, "d", list(spec_c.labels), registry=registry).labels(*labels)
    return (lambda v, t: h.observe(v, exemplar={"trace_id": t})), c.inc


def bare_call(tracer: Any, backend: str, node: str | None) -> Callable[[], None]:
    observe, inc = _bare_metrics(backend)
    attrs: dict[str, Any] = {catalog.A_HOOK: HOOK, catalog.A_CLASS: "bench.Bare",
                             catalog.A_CALLBACK: "bare", catalog.A_MODEL: "bench",
                             catalog.A_PID: os.getpid()}
    if node:
        attrs[catalog.A_NODE_ID] = node
    target = NoopSync(llm_config=None, ctx_kwargs={}, telemetry={"enabled": False})
    method = target.on_before_node_init

    def call() -> None:
        span = tracer.start_span(BARE_SPAN, attributes=attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        t0 = time.perf_counter()
        method()
        elapsed = time.perf_counter() - t0
        otel_context.detach(token)
        span.set_attribute(catalog.A_OUTCOME, catalog.OUTCOME_OK)
        trace_id = format(span.get_span_context().trace_id, "032x")
        span.end()
        observe(elapsed, trace_id)
        inc()

    return call


def _round(fn: Callable[[], Any], flush: Callable[[], Any], iterations: int
           ) -> tuple[float, float]:
    """(wall s, process CPU s) per call over ``iterations`` calls and the flush after them."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        fn()
    flush()
    return ((time.perf_counter() - w0) / iterations, (time.process_time() - c0) / iterations)


def measure_row(endpoint: str, iterations: int, rounds: int, installed: bool = False
                ) -> dict[str, Any]:
    """One row: wrapped vs bare, ``rounds`` interleaved rounds, in this process."""
    reset_telemetry()
    bare_provider = _sdk_provider(endpoint)
    if installed:
        trace.set_tracer_provider(bare_provider)  # ours reuses it; the bare side uses it too
    cb = NoopSync(llm_config=None, ctx_kwargs={}, telemetry={"endpoint": endpoint})
    wrapped = lambda: cb.run_callback_sync(HOOK)  # noqa: E731
    wrapped()  # build telemetry and metric children before timing
    tel = get_telemetry(cb.telemetry_settings)
    backend = tel.backends[0].name
    node = tel.process_attributes.get(catalog.R_RAY_NODE)
    bare = bare_call(bare_provider.get_tracer("bench"), backend, node)
    bare()
    results: dict[str, list[tuple[float, float]]] = {"wrapped": [], "bare": []}
    for r in range(rounds):
        sides = [("bare", bare, bare_provider.force_flush),
                 ("wrapped", wrapped, lambda: tel.force_flush(30))]
        for name, fn, flush in (sides if r % 2 == 0 else sides[::-1]):
            results[name].append(_round(fn, flush, iterations))
    out: dict[str, Any] = {"backend": backend, "installed_provider": installed,
                           "metric_backends": [b.name for b in tel.backends],
                           "iterations": iterations, "rounds": rounds}
    for i, measure in enumerate(("wall", "cpu")):
        best = {k: min(v[i] for v in vals) for k, vals in results.items()}
        out[f"bare_{measure}_us"] = round(best["bare"] * 1e6, 2)
        out[f"wrapped_{measure}_us"] = round(best["wrapped"] * 1e6, 2)
        out[f"ratio_{measure}"] = round(best["wrapped"] / best["bare"], 3)
        # Each round's two sides ran back to back: their ratio is free of the drift between
        # rounds that can leave one side's best round in a quieter moment than the other's.
        paired = sorted(w[i] / b[i] for w, b in zip(results["wrapped"], results["bare"],
                                                     strict=True))
        out[f"paired_ratio_{measure}_median"] = round(statistics.median(paired), 3)
        out[f"paired_ratio_{measure}_range"] = [round(paired[0], 3), round(paired[-1], 3)]
    if not installed:
        bare_provider.shutdown()
    reset_telemetry()
    return out


def _in_ray_worker(endpoint: str, iterations: int, rounds: int) -> dict[str, Any]:
    """The row inside a Ray task (Ray's metrics backend)."""
    import tempfile

    import ray

    from tests._support.ray_env import start_local_ray

    with tempfile.TemporaryDirectory(prefix="hook-overhead-") as tmp:
        run = start_local_ray(Path(tmp), num_cpus=2)
        try:
            task = ray.remote(num_cpus=1)(measure_row)
            result: dict[str, Any] = ray.get(task.remote(endpoint, iterations, rounds))
        finally:
            run.shutdown()
    return result


def _print_row(name: str, row: dict[str, Any]) -> None:
    print(f"{name} [{'+'.join(row['metric_backends'])}]: wrapped {row['wrapped_wall_us']} us "
          f"vs bare {row['bare_wall_us']} us per call (wall) -> ratio {row['ratio_wall']}; "
          f"process CPU {row['wrapped_cpu_us']} vs {row['bare_cpu_us']} us -> ratio "
          f"{row['ratio_cpu']} (goal <= 1.2); paired rounds: CPU median "
          f"{row['paired_ratio_cpu_median']} (range {row['paired_ratio_cpu_range']}), wall "
          f"median {row['paired_ratio_wall_median']}", flush=True)


COLLECTOR_MODES = ("healthy", "closed", "hang")


def measure_collectors(iterations: int, rounds: int) -> dict[str, Any]:
    """Per-call cost of one no-op hook with the collector healthy, down, and hanging."""
    import contextlib
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llm_otel_callbacks.demo.fault_collector import FaultCollector

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
    parser.add_argument("--iterations", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray worker row")
    parser.add_argument("--collectors", action="store_true",
                        help="also run the collector-down comparison (healthy, closed, hang)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from benchmarks.request_overhead import _Receiver

    receiver = _Receiver()
    rows: dict[str, Any] = {}
    try:
        time.sleep(2)  # the receiver process starts listening
        rows["outside Ray"] = measure_row(receiver.endpoint, args.iterations, args.rounds)
        _print_row("outside Ray", rows["outside Ray"])
        if not args.no_ray:
            rows["inside a Ray worker"] = _in_ray_worker(receiver.endpoint, args.iterations,
                                                         args.rounds)
            _print_row("inside a Ray worker", rows["inside a Ray worker"])
        rows["installed provider"] = measure_row(receiver.endpoint, args.iterations,
                                                 args.rounds, installed=True)
        _print_row("installed provider", rows["installed provider"])
    finally:
        received = receiver.stop()
    made = args.iterations * args.rounds + 1
    print(f"spans received: {received} (each side made {made} per row)")
    result: dict[str, Any] = {"rows": rows, "spans_received": received}
    print(json.dumps(result, indent=2))
    if args.collectors:
        down = measure_collectors(max(1, args.iterations), args.rounds)
        result["collectors"] = down
        print(json.dumps(down, indent=2))
        for mode in COLLECTOR_MODES[1:]:
            print(
                f"collector {mode}: median {down[mode]['median_us']} us vs healthy "
                f"{down['healthy']['median_us']} us (ratio {down[f'ratio_median_{mode}']}), "
                f"p99 {down[f'p99_delta_{mode}_us']:+} us, max {down[mode]['max_us']} us "
                f"(full GCs in its calls: {down[mode]['full_gcs']})"
            )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
