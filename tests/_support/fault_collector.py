"""The misbehaving collector of the package's toolkit
(:mod:`llm_otel_callbacks.demo.fault_collector`), under the name the tests import."""

from llm_otel_callbacks.demo.fault_collector import (
    FAULT_MODES,
    MODES,
    FaultCollector,
    HookRun,
    NoopHooks,
    dropped_spans,
    run_hooks,
    time_calls,
)

__all__ = [
    "FAULT_MODES",
    "MODES",
    "FaultCollector",
    "HookRun",
    "NoopHooks",
    "dropped_spans",
    "run_hooks",
    "time_calls",
]
