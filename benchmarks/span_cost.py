"""What one request span costs on the request's thread: the SDK's span vs a lean span.

Both tracers come from the same kind of provider this package builds (same sampler, resource,
limits), each with one ``SpanQueueProcessor`` whose exporter discards, so only the hook-side
cost is measured: start with the request's attributes, one ``set_attributes`` with the
response's, one hook-call event, end (queued). Thread CPU per span, best of ``--repeat``
interleaved rounds.

Run: ``python benchmarks/span_cost.py [--spans N] [--repeat R] [--out result.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

START = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm",
         "gen_ai.request.model": "tiny", "llm.stream": True, "llm.request_id": "req-0123",
         "gen_ai.request.max_tokens": 16, "gen_ai.request.temperature": 0.0}
RESPONSE = {"gen_ai.response.id": "chatcmpl-0123", "gen_ai.response.model": "tiny",
            "gen_ai.response.finish_reasons": ["length"], "gen_ai.usage.input_tokens": 9,
            "gen_ai.usage.output_tokens": 16, "llm.chunks": 16}
EVENT = {"llm_callback.hook": "on_llm_end", "llm_callback.callback": "TokenCounter",
         "llm_callback.outcome": "ok", "llm_callback.hook.seconds": 1.5e-5}


def _tracers() -> tuple[Any, Any, list[Any]]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from llm_otel_callbacks.telemetry.export import SpanQueueProcessor
    from llm_otel_callbacks.telemetry.lean_spans import LeanTracer, OwnTracerProvider

    class Discard(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    processors = []
    tracers = []
    for _ in range(2):
        provider = OwnTracerProvider(resource=Resource({"service.name": "bench"}),
                                     shutdown_on_exit=False, span_limits=SpanLimits())
        processor = SpanQueueProcessor(Discard(), max_queue_size=1 << 20,
                                       max_export_batch_size=1 << 20, schedule_delay_s=3600)
        provider.add_span_processor(processor)
        processors.append(processor)
        tracers.append(LeanTracer(provider, provider.get_tracer("bench")))
    return tracers[0].sdk_tracer, tracers[1], processors


def _loop(tracer: Any, n: int) -> float:
    from opentelemetry.trace import SpanKind

    gc.collect()
    t0 = time.thread_time()
    for _ in range(n):
        span = tracer.start_span("chat tiny", kind=SpanKind.SERVER, attributes=dict(START))
        span.set_attributes(RESPONSE)
        span.add_event("llm_callback.hook_call", EVENT)
        span.end()
    return (time.thread_time() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sdk, lean, processors = _tracers()
    _loop(sdk, 500)
    _loop(lean, 500)
    best = {"sdk": float("inf"), "lean": float("inf")}
    for _ in range(args.repeat):
        for name, tracer in (("sdk", sdk), ("lean", lean)):
            best[name] = min(best[name], _loop(tracer, args.spans))
            for processor in processors:  # keep memory flat (another thread: not counted)
                processor.force_flush()
    result = {"spans": args.spans, "repeat": args.repeat, "us_per_span": best,
              "ratio_lean_to_sdk": best["lean"] / best["sdk"]}
    print(f"SDK span {best['sdk']:.1f} us, lean span {best['lean']:.1f} us per request span "
          f"(thread CPU, best of {args.repeat}): lean/SDK = {result['ratio_lean_to_sdk']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
