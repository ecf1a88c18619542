"""vLLM's ``LLM(...)`` in a process of its own, for tests/test_engine_phases.py.

``python -m tests._support.engine_probe plain <model> <out.json>``: nothing configured (a plain
vLLM process on a machine where the package is installed); generates a few tokens and writes
what this process saw.

``python -m tests._support.engine_probe replica <model> <out.json> <otlp endpoint> [tp]``: plays
the replica's part (the engine-start span, :class:`EnginePhases`) around an engine start, as
ObservedLLMServer does, exporting to ``endpoint``; writes the outcome.

vLLM spawns its processes, so this must be a module with a ``__main__`` guard.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

ENGINE = {"max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 256,
          "enforce_eager": True, "dtype": "float32"}


def plain(model: str) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    threads_before = {t.name for t in threading.enumerate()}
    llm = LLM(model=model, **ENGINE)
    out = llm.generate(["hello there"], SamplingParams(max_tokens=4, temperature=0))
    return {
        "text_tokens": len(out[0].outputs[0].token_ids),
        "plugin_module_loaded": "llm_otel_callbacks_vllm_plugin" in sys.modules,
        "package_imported": "llm_otel_callbacks" in sys.modules,
        "new_threads": sorted({t.name for t in threading.enumerate()} - threads_before),
    }


def replica(model: str, endpoint: str, tp: int) -> dict[str, Any]:
    from opentelemetry.trace import Status, StatusCode

    from llm_otel_callbacks import catalog
    from llm_otel_callbacks.telemetry import TelemetrySettings, get_telemetry
    from llm_otel_callbacks.vllm_plugin._replica import EnginePhases

    tel = get_telemetry(TelemetrySettings(endpoint=endpoint, metrics_backend="none",
                                          otlp_metrics=False, schedule_delay_ms=100))
    started = time.time_ns()
    span = tel.tracer.start_span(catalog.SPAN_ENGINE_START, start_time=started)
    phases = EnginePhases.open("tiny", tel, span, started)
    assert phases is not None
    error: BaseException | None = None
    try:
        from vllm import LLM

        LLM(model=model, tensor_parallel_size=tp, **ENGINE)
    except Exception as exc:
        error = exc
    phases.close(time.time_ns(), error)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()
    tel.shutdown()
    return {"error": None if error is None else f"{type(error).__name__}: {error}",
            "failed_phase": phases.failed_phase, "coverage": phases.coverage,
            "replica_pid": os.getpid()}


def main() -> None:
    mode, model, out = sys.argv[1:4]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if mode == "plain":
        result = plain(model)
    else:
        tp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
        result = replica(model, sys.argv[4], tp)
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
