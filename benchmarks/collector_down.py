"""What a dead or hanging collector costs a process that serves: stalls, full GCs, exit time.

Each run is a fresh process with Ray and vLLM imported (``import llm_otel_callbacks`` does;
~660k objects, so one full collection takes ~350 ms) that calls a no-op hook through a real
``RayServeLLMCallback`` about once per millisecond for ``--window`` seconds, exporting spans
and metrics over OTLP/HTTP to a real local collector (tests/_support/fault_collector.py),
then exits. Per run: per-call median/p99/max, full (generation-2) collections in the window
and their durations, old-generation garbage left (cyclic garbage only a full collection
frees: what triggers them), spans dropped (scraped from the prometheus_client endpoint),
and the time from the last hook to the end of telemetry's exit flush and to the process end.

``ours``: this package's exporter stack (span queue, one-shot OTLP session, back-off).
``stock``: the SDK's own pipeline (BatchSpanProcessor + OTLPSpanExporter, periodic OTLP
metric reader, default retries, exit flush by the SDK's atexit handler), installed as the
global providers, which the callback reuses.

Run: ``python benchmarks/collector_down.py [--window S] [--runs ours:closed,stock:closed,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ("ours:healthy", "ours:closed", "ours:hang", "stock:healthy", "stock:closed")


def child(impl: str, mode: str, window_s: float) -> None:
    """One run, in this process; prints JSON lines the parent reads."""
    import atexit
    import gc

    sys.path.insert(0, str(REPO_ROOT))
    atexit.register(lambda: print(json.dumps({"flushed": time.time()}), flush=True))
    import llm_otel_callbacks  # noqa: F401  (Ray and vLLM: the heavy process of a replica)
    from llm_otel_callbacks.demo.fault_collector import (
        FaultCollector,
        NoopHooks,
        dropped_spans,
        time_calls,
    )
    from llm_otel_callbacks.telemetry import get_telemetry

    collector = FaultCollector(mode).start()  # left running: the exit meets the fault too
    if impl == "stock":
        _install_stock(collector.endpoint)
    cb = NoopHooks(llm_config=None, ctx_kwargs={}, telemetry={
        "endpoint": collector.endpoint, "metrics_backend": "prometheus", "prometheus_port": 0})
    tel = get_telemetry(cb.telemetry_settings)
    calls = int(window_s * 1000 / 1.1)  # ~1 call per ms with the pauses
    durations, full_ms, old_garbage = time_calls(cb, calls, pause_every=1, pause_s=0.001)
    ordered = sorted(durations)
    assert tel.prometheus_port is not None
    print(json.dumps({
        "objects": len(gc.get_objects()), "calls": len(durations),
        "median_us": round(ordered[len(ordered) // 2] * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 1),
        "max_us": round(ordered[-1] * 1e6, 1),
        "full_gcs": len(full_ms), "full_gc_ms": [round(x) for x in full_ms],
        "old_garbage": old_garbage,
        "connections": collector.connections,
        "dropped": dropped_spans(tel.prometheus_port),
        "last_hook": time.time(),
    }), flush=True)


def _install_stock(endpoint: str) -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint + "/v1/traces", timeout=5)))
    trace.set_tracer_provider(provider)
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint + "/v1/metrics", timeout=5))
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def run(impl: str, mode: str, window_s: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", f"{impl}:{mode}", "--window", str(window_s)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    out, _ = proc.communicate(timeout=600)
    ended = time.time()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    result: dict[str, Any] = {"run": f"{impl}:{mode}", "rc": proc.returncode}
    for line in lines:
        result.update(line)
    last = result.pop("last_hook", None)
    flushed = result.pop("flushed", None)
    if last is not None:
        result["exit_flush_s"] = round(flushed - last, 2) if flushed else None
        result["exit_s"] = round(ended - last, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=20.0, help="seconds of hook calls")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, mode = args.child.split(":")
        child(impl, mode, args.window)
        return
    for spec in args.runs.split(","):
        impl, mode = spec.split(":")
        print(json.dumps(run(impl, mode, args.window)), flush=True)


if __name__ == "__main__":
    main()
