"""Each request-hook call is observed like a startup hook call (an event on the request span,
a duration point); a callback passes kwargs on to later ones (CostTracker's ``cost``); the
CostLimiter's budgets. The engine is test_serve_requests' stream-protocol engine; the real
deployment checks are in test_seeds_serve.py and test_serve_e2e.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_otel_callbacks import CallbackConfigError, Composite, RayServeLLMCallback, catalog
from llm_otel_callbacks.builtin import CostLimiter, CostLimitExceeded
from llm_otel_callbacks.serve import share_kwargs
from llm_otel_callbacks.serve._requests import RESPONSE_FIELD
from llm_otel_callbacks.telemetry.providers import Telemetry
from tests import test_serve_requests as _requests
from tests.test_serve_requests import (
    PROMPT_TOKENS,
    Boom,
    ChunkRecorder,
    Engine,
    Recorder,
    chat_request,
    child,
    collect,
    instance,
    make_observer,
    run,
    scrape,
    total,
)

# That module's fixtures: the telemetry with a scraped endpoint, in-memory spans, Ray's models.
tel, spans, models = _requests.tel, _requests.spans, _requests.models

DURATION = "llm_callback_hook_duration_seconds"
PRICE = {"input": 1.0, "output": 2.0}


def _calls(span: Any) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e.attributes[catalog.A_HOOK], e.attributes[catalog.A_CALLBACK], dict(e.attributes))
            for e in span.events if e.name == catalog.EVENT_HOOK_CALL]


def test_each_request_hook_call_is_an_event_and_a_duration_point(
    tel: Telemetry, spans: InMemorySpanExporter, models: Any
) -> None:
    observer = make_observer(tel, [child(Recorder, "rec"), child(ChunkRecorder, "chunks")],
                             models)
    before = scrape(tel)
    run(collect(observer.observe("chat", Engine(tokens=3).chat,
                                 chat_request(models, stream=True), None)))
    (span,) = spans.get_finished_spans()
    calls = _calls(span)
    assert [(h, c) for h, c, _ in calls] == [
        ("on_llm_start", "rec"), ("on_llm_start", "chunks"),
        # Chunks: one event per callback and stream, with the number of calls.
        ("on_llm_stream_chunk", "chunks"),
        ("on_llm_end", "rec"), ("on_llm_end", "chunks"),
    ]
    assert all(a[catalog.A_OUTCOME] == "ok" and a[catalog.A_HOOK_SECONDS] >= 0
               for _, _, a in calls)
    assert calls[2][2][catalog.A_HOOK_CALLS] == 4  # the role chunk and three tokens

    after = scrape(tel)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for hook in ("on_llm_start", "on_llm_end"):
        for name in ("rec", "chunks"):
            assert grew(DURATION + "_count", hook=hook, callback=name, outcome="ok") == 1
    # A stream's chunk calls: counted one by one, timed as one point (their sum).
    chunk = {"hook": "on_llm_stream_chunk", "callback": "chunks", "outcome": "ok"}
    assert grew(DURATION + "_count", **chunk) == 1
    assert grew("llm_callback_hook_calls_total", **chunk) == 4
    assert grew(DURATION + "_sum", **chunk) == pytest.approx(
        calls[2][2][catalog.A_HOOK_SECONDS])


def test_a_failed_request_hook_call_is_timed_under_its_outcome(
    tel: Telemetry, spans: InMemorySpanExporter, models: Any
) -> None:
    observer = make_observer(tel, [child(Boom, "flaky", raise_error_on_callback=False,
                                         callback_kwargs={"where": "end"})], models)
    key = {"hook": "on_llm_end", "callback": "flaky", "outcome": "error"}
    before = total(scrape(tel), DURATION + "_count", **key)
    run(collect(observer.observe("chat", Engine().chat, chat_request(models), None)))
    assert total(scrape(tel), DURATION + "_count", **key) - before == 1
    (span,) = spans.get_finished_spans()
    (error,) = [e for e in span.events if e.name == catalog.EVENT_HOOK_ERROR]
    assert error.attributes[catalog.A_HOOK_SECONDS] >= 0
    # Its start hook went fine (an ok event); the failed end has the error event only.
    assert [(h, c) for h, c, _ in _calls(span)] == [("on_llm_start", "flaky")]


def test_cost_reaches_the_callbacks_after_the_cost_tracker_only(
    tel: Telemetry, models: Any
) -> None:
    observer = make_observer(tel, [
        child(Recorder, "before"),
        child("llm_otel_callbacks.builtin.CostTracker", "cost",
              callback_kwargs={"prices": {"m": PRICE}}),
        child(Recorder, "after"),
    ], models)
    run(collect(observer.observe("chat", Engine(tokens=5).chat, chat_request(models), None)))
    (end_before,) = [c for c in instance(observer, "before").calls if c[0] == "end"]
    (end_after,) = [c for c in instance(observer, "after").calls if c[0] == "end"]
    assert "cost" not in end_before[2]
    assert end_after[2]["cost"] == pytest.approx((PROMPT_TOKENS * 1.0 + 5 * 2.0) / 1e6)
    # A kwarg passed on lives for that hook only: the next request starts without it.
    (start_after,) = [c for c in instance(observer, "after").calls if c[0] == "start"]
    assert "cost" not in start_after[2]


class Overrides(RayServeLLMCallback):
    async def on_llm_end(self, response: Any, **kw: Any) -> None:
        share_kwargs(model="not-yours")


def test_share_kwargs_cannot_replace_a_server_kwarg_and_is_false_outside_hooks(
    tel: Telemetry, models: Any
) -> None:
    assert share_kwargs(cost=1.0) is False  # no request hook is running: nothing to pass
    observer = make_observer(tel, [child(Overrides, "over", raise_error_on_callback=True),
                                   child(Recorder, "rec")], models)
    (out,) = run(collect(observer.observe("chat", Engine().chat, chat_request(models), None)))
    # The raise policy: the request fails naming the callback, and the later callback's end
    # hook still ran, with the server's own model.
    assert out.error.code == 500 and "'over'" in out.error.message
    (end,) = [c for c in instance(observer, "rec").calls if c[0] == "end"]
    assert end[2]["model"] == "m"


# --- CostLimiter ------------------------------------------------------------------------------


def _limiter(**kwargs: Any) -> tuple[CostLimiter, list[float]]:
    now = [7_200.0 + 10]  # 10 s into an hour window
    limiter = CostLimiter(**{"default_price": PRICE, "window_s": 3600, **kwargs})
    limiter.clock = lambda: now[0]  # type: ignore[method-assign]
    return limiter, now


def _request(limiter: CostLimiter, cost: float | None = None, **kw: Any) -> None:
    async def go() -> None:
        await limiter.on_llm_start("p", **kw)
        extra = {} if cost is None else {"cost": cost}
        await limiter.on_llm_end(None, prompt_tokens=1_000, completion_tokens=0, **kw, **extra)

    asyncio.run(go())


def test_cost_limiter_refuses_a_spent_key_until_the_next_window() -> None:
    limiter, now = _limiter(max_cost=0.0025, key="user")
    _request(limiter, user="ann")  # its own prices: 1,000 input tokens = 0.001
    _request(limiter, cost=0.002, user="ann")  # an earlier CostTracker's cost wins
    assert limiter.spent("user:ann") == pytest.approx(0.003)
    with pytest.raises(CostLimitExceeded) as refused:
        _request(limiter, user="ann")
    assert refused.value.status_code == 429 and refused.value.reason == "cost"
    assert refused.value.retry_after_s == pytest.approx(3590)
    assert "0.0025 USD per 3600s window" in refused.value.message
    _request(limiter, user="bob")  # another key has its own budget
    now[0] += 3590  # the next window: ann starts again
    _request(limiter, user="ann")
    assert limiter.spent("user:ann") == pytest.approx(0.001)


def test_cost_limiter_anonymous_global_and_bounded_keys() -> None:
    exempt, _ = _limiter(max_cost=0.0001, key="api_key", anonymous="exempt")
    for _ in range(3):
        _request(exempt)  # no key: not limited
    shared, _ = _limiter(max_cost=0.0001, key="api_key")
    _request(shared)
    with pytest.raises(CostLimitExceeded):
        _request(shared, user="someone")  # no api key: the one anonymous budget
    everyone, _ = _limiter(max_cost=0.0001, key="global")
    _request(everyone, api_key_id="a")
    with pytest.raises(CostLimitExceeded):
        _request(everyone, api_key_id="b")
    bounded, _ = _limiter(max_cost=1, key="user", max_keys=3)
    for i in range(10):
        _request(bounded, user=f"u{i}")
    assert len(bounded.process_cache["cost_limiter.spent"]) == 3


def test_cost_limiter_without_a_cost_source_is_refused_naming_the_field() -> None:
    with pytest.raises(CallbackConfigError, match=r"callback_kwargs\.prices.*CostTracker"):
        CostLimiter(max_cost=1)  # alone in the replica: nobody passes it a cost
    with pytest.raises(CallbackConfigError,
                       match=r"callbacks\[1\] \(budget\): field 'callback_kwargs\.prices'"):
        Composite(callbacks=[
            {"callback_class": "llm_otel_callbacks.builtin.TokenCounter"},
            {"callback_class": "llm_otel_callbacks.builtin.CostLimiter", "name": "budget",
             "callback_kwargs": {"max_cost": 1}},
            {"callback_class": "llm_otel_callbacks.builtin.CostTracker"},  # too late
        ])
    Composite(callbacks=[  # a CostTracker before it: accepted
        {"callback_class": "llm_otel_callbacks.builtin.CostTracker"},
        {"callback_class": "llm_otel_callbacks.builtin.CostLimiter",
         "callback_kwargs": {"max_cost": 1}},
    ])
    with pytest.raises(CallbackConfigError, match="max_cost"):
        CostLimiter(default_price=PRICE)
    with pytest.raises(CallbackConfigError, match="anonymous"):
        CostLimiter(default_price=PRICE, max_cost=1, key="global", anonymous="exempt")


def test_cost_limiter_refusal_reaches_the_client_as_429(tel: Telemetry, models: Any) -> None:
    observer = make_observer(tel, [
        child("llm_otel_callbacks.builtin.CostTracker", callback_kwargs={"prices": {"m": PRICE}}),
        child("llm_otel_callbacks.builtin.CostLimiter", "budget",
              callback_kwargs={"max_cost": 1e-9, "key": "user"}),
    ], models)
    ok = run(collect(observer.observe("chat", Engine().chat, chat_request(models, user="u"),
                                      None)))
    assert ok[0].usage is not None
    (refused,) = run(collect(observer.observe("chat", Engine().chat,
                                              chat_request(models, user="u"), None)))
    assert refused.error.code == 429
    body = refused.error.model_extra[RESPONSE_FIELD]["error"]
    assert body["code"] == "cost_limit_exceeded" and body["type"] == "cost"
