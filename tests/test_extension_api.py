"""The public extension API of RayServeLLMCallback (``metric(spec)``, ``tracer``,
``startup_context()``, ``process_attributes``): a subclass of a user's records its own metric
(checked after a real scrape) and its own span under the startup span (checked after a real
OTLP export); and every built-in uses only that API, never the private telemetry path."""

from __future__ import annotations

import ast
import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import Unpack

from llm_otel_callbacks import MetricSpec, RayServeLLMCallback, catalog
from llm_otel_callbacks.serve import LLMEndKwargs
from llm_otel_callbacks.serve.hook_kwargs import end_kwargs, start_kwargs
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.otlp_receiver import OtlpHttpReceiver

BUILTIN = Path(__file__).resolve().parents[1] / "llm_otel_callbacks" / "builtin"

SLOW_REQUESTS = MetricSpec("ext_api_slow_requests", "counter", "1",
                           "Requests slower than 5 s (test).", ("model",))


class SlowRequests(RayServeLLMCallback):
    """What docs/builtins.md shows: a metric and a span of one's own."""

    async def on_llm_end(self, response: Any, **kwargs: Unpack[LLMEndKwargs]) -> None:
        if kwargs["duration_ms"] > 5_000:
            self.metric(SLOW_REQUESTS).add((kwargs["model"],))

    def on_before_node_init(self) -> None:
        with self.tracer.start_as_current_span("ext_api_check", context=self.startup_context()):
            pass


@pytest.fixture(autouse=True)
def _fresh_telemetry() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


def _end(duration_ms: float) -> LLMEndKwargs:
    base = start_kwargs(model="m1", request_id="r", trace_id=None, stream=False,
                        operation="chat", user=None, api_key_id=None, request=None)
    return end_kwargs(base, prompt_tokens=1, completion_tokens=2, duration_ms=duration_ms,
                      time_to_first_token_ms=None, chunks=None)


def test_a_subclass_metric_is_scraped() -> None:
    cb = SlowRequests(llm_config=None, telemetry={
        "metrics_backend": "prometheus", "prometheus_port": 0, "traces_file": "/dev/null"})
    asyncio.run(cb.on_llm_end(None, **_end(6_000)))
    asyncio.run(cb.on_llm_end(None, **_end(10)))  # fast: not counted
    asyncio.run(cb.on_llm_end(None, **_end(7_000)))
    port = cb._observer.tel.prometheus_port  # the test reads the port; subclasses never need it
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'ext_api_slow_requests_total{model="m1"} 2.0' in text


def test_a_subclass_span_joins_the_startup_trace_after_a_real_export() -> None:
    with OtlpHttpReceiver() as rx:
        cb = SlowRequests(llm_config=None, telemetry={
            "endpoint": rx.endpoint, "schedule_delay_ms": 50, "otlp_metrics": False})
        assert cb.process_attributes["process.pid"] > 0
        cb.run_callback_sync("on_before_node_init")
        cb.end_startup()
        spans = rx.wait_for_spans(lambda got: len(got) >= 3, timeout=10)
    by_name = {s.name: s for s in spans}
    startup = by_name[catalog.SPAN_STARTUP]
    hook = by_name[catalog.SPAN_HOOK_PREFIX + "on_before_node_init"]
    mine = by_name["ext_api_check"]
    assert mine.trace_id == hook.trace_id == startup.trace_id
    assert mine.parent_span_id == startup.span_id


# Names a built-in may not touch: the private telemetry path behind the extension API.
_PRIVATE = {"_observer", "_local", "_make_local", "tel", "recorder"}


@pytest.mark.parametrize("path", sorted(BUILTIN.glob("*.py")), ids=lambda p: p.name)
def test_builtins_use_only_the_public_extension_api(path: Path) -> None:
    tree = ast.parse(path.read_text())
    touched = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & _PRIVATE
    assert not touched, f"{path.name} uses {sorted(touched)}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
            # from ..x import y: public modules of the package, the Ray boundary, and the one
            # shared text helper (an error as a log line or span status, secrets kept out).
            names = {a.name for a in node.names}
            private = any(part.startswith("_") for part in node.module.split("."))
            allowed = node.module == "_ray" or (node.module, names) == ("_observe", {"error_text"})
            assert not private or allowed, f"{path.name}: {sorted(names)} from ..{node.module}"
