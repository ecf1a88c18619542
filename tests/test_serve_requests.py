"""The request path without a cluster: hook resolution and policies, stream observation, the
built-ins' arithmetic, the ingress's rejection answer, ``server_cls`` from YAML.

The engine here is a generator speaking vLLM's streaming protocol as vLLM 0.29 writes it
(``data: {...}`` chunks, a ``"choices":[]`` usage chunk when ``stream_options.include_usage``,
running usage with ``continuous_usage_stats``, ``data: [DONE]``); requests are Ray's real
request models. The real engine is exercised in test_serve_e2e.py. Spans go to OTel's in-memory
exporter; metrics are read by scraping a prometheus_client endpoint over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from llm_otel_callbacks import CallbackConfigError, Composite, RayServeLLMCallback, catalog
from llm_otel_callbacks._request_hooks import RequestHooks, RequestRejected
from llm_otel_callbacks.builtin.cost import CostTracker
from llm_otel_callbacks.builtin.progress import StreamingProgress
from llm_otel_callbacks.builtin.rate_limit import RateLimiter, RateLimitExceeded
from llm_otel_callbacks.builtin.tokens import TokenCounter
from llm_otel_callbacks.serve._requests import RESPONSE_FIELD, RequestObserver
from llm_otel_callbacks.telemetry import TelemetrySettings
from llm_otel_callbacks.telemetry.providers import Telemetry

PROMPT_TOKENS = 7


@pytest.fixture(scope="module")
def models() -> Any:
    from ray.llm._internal.serve.core.configs import openai_api_models

    return openai_api_models


@pytest.fixture(scope="module")
def tel() -> Iterator[Telemetry]:
    settings = TelemetrySettings.resolve(
        {"metrics_backend": "prometheus", "prometheus_port": 0}, environ={}
    )
    telemetry = Telemetry(settings)
    yield telemetry
    telemetry.shutdown()


@pytest.fixture
def spans(tel: Telemetry) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tel.tracer = provider.get_tracer("test")
    return exporter


def scrape(tel: Telemetry) -> dict[str, list[tuple[dict[str, str], float]]]:
    url = f"http://127.0.0.1:{tel.prometheus_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def total(m: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


# --- an engine speaking vLLM's stream protocol ------------------------------------------------


class Engine:
    """Yields what VLLMEngine.chat yields, honouring stream_options like vLLM does."""

    def __init__(self, tokens: int = 4, fail_at: int | None = None) -> None:
        self.tokens = tokens
        self.fail_at = fail_at
        self.calls: list[Any] = []
        self.closed = False

    async def chat(self, request: Any, raw: Any = None) -> AsyncIterator[Any]:
        self.calls.append(request)
        if not request.stream:
            from ray.llm._internal.serve.core.configs.openai_api_models import (
                ChatCompletionResponse,
            )

            yield ChatCompletionResponse.model_validate({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b"},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": self.tokens,
                          "total_tokens": PROMPT_TOKENS + self.tokens},
            })
            return
        opts = request.stream_options
        usage = bool(opts and opts.include_usage)
        continuous = usage and bool(opts.continuous_usage_stats)
        try:
            for i in range(self.tokens + 1):  # a role chunk, then one chunk per token
                if self.fail_at == i:
                    raise RuntimeError("engine died")
                delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"t{i}"}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": None}
                if i == self.tokens:
                    choice["finish_reason"] = "length"
                chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                         "created": 1, "model": "m", "choices": [choice]}
                if continuous:
                    chunk["usage"] = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": i,
                                      "total_tokens": PROMPT_TOKENS + i}
                await asyncio.sleep(0)
                yield "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"
            if usage:
                final = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                         "model": "m", "choices": [],
                         "usage": {"prompt_tokens": PROMPT_TOKENS,
                                   "completion_tokens": self.tokens,
                                   "total_tokens": PROMPT_TOKENS + self.tokens}}
                yield "data: " + json.dumps(final, separators=(",", ":")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.closed = True


def make_observer(tel: Telemetry, callbacks: list[Any], models: Any) -> RequestObserver:
    from llm_otel_callbacks.serve._engine import engine_error_types, make_error_response

    composite = Composite(callbacks=callbacks)
    hooks = RequestHooks(composite.hook_targets(), tel.recorder(catalog.HOOK_CALLS), "m",
                         durations=tel.recorder(catalog.HOOK_DURATION))
    return RequestObserver(
        model="m", provider="vllm", tel=tel, hooks=hooks,
        error_response=make_error_response, error_types=engine_error_types(),
    )


def chat_request(models: Any, **extra: Any) -> Any:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "request_id": f"req-{time.perf_counter_ns()}", **extra}
    return models.ChatCompletionRequest(**body)


async def collect(gen: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in gen]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- callbacks used as composite children -----------------------------------------------------


class Recorder(RayServeLLMCallback):
    calls: list[tuple[str, Any, dict[str, Any]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = []

    async def on_llm_start(self, prompt: Any, **kw: Any) -> None:
        self.calls.append(("start", prompt, kw))

    async def on_llm_end(self, response: Any, **kw: Any) -> None:
        self.calls.append(("end", response, kw))

    async def on_llm_error(self, error: Any, **kw: Any) -> None:
        self.calls.append(("error", error, kw))


class ChunkRecorder(Recorder):
    def on_llm_stream_chunk(self, chunk: Any, **kw: Any) -> None:
        self.calls.append(("chunk", chunk, kw))


class StartOnly(RayServeLLMCallback):
    def on_llm_start(self, prompt: Any, **kw: Any) -> None:
        self.seen = kw["request_id"]


class Boom(RayServeLLMCallback):
    async def on_llm_start(self, prompt: Any, **kw: Any) -> None:
        if self.kwargs.get("where") == "start":
            raise RuntimeError("start exploded")

    async def on_llm_end(self, response: Any, **kw: Any) -> None:
        if self.kwargs.get("where") == "end":
            raise RuntimeError("end exploded")


class Slow(RayServeLLMCallback):
    async def on_llm_end(self, response: Any, **kw: Any) -> None:
        await asyncio.sleep(5)


class NoRequestHooks(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        return None


def child(cls: type, name: str | None = None, **spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"callback_class": cls, **spec}
    if name:
        out["name"] = name
    return out


def instance(observer: RequestObserver, name: str) -> Any:
    for b in (*observer.hooks.start, *observer.hooks.end, *observer.hooks.chunk):
        if b.name == name:
            return b.fn.__self__
    raise KeyError(name)


# --- hook resolution --------------------------------------------------------------------------


def test_hooks_are_resolved_once_and_unimplemented_ones_are_empty(tel: Telemetry, models: Any):
    observer = make_observer(tel, [child(NoRequestHooks), child(StartOnly)], models)
    hooks = observer.hooks
    assert [b.name for b in hooks.start] == ["StartOnly"]
    assert hooks.end == () and hooks.error == () and hooks.chunk == ()
    assert hooks.start[0].is_async is False

    nothing = make_observer(tel, [child(NoRequestHooks)], models)
    assert not nothing.hooks.any


def test_no_hooks_stream_passes_through_untouched_and_measures(
    tel: Telemetry, spans: InMemorySpanExporter, models: Any
):
    observer = make_observer(tel, [child(NoRequestHooks)], models)
    engine = Engine(tokens=5)
    before = scrape(tel)
    request = chat_request(models, stream=True)
    out = run(collect(observer.observe("chat", engine.chat, request, None)))

    # The server asked the engine for usage; the client, who did not, sees no usage chunk.
    assert engine.calls[0].stream_options.include_usage is True
    assert engine.calls[0].stream_options.continuous_usage_stats is False
    assert out[-1] == "data: [DONE]\n\n"
    assert not any('"usage"' in c for c in out)
    assert len(out) == 5 + 2  # role + 5 tokens + DONE

    (span,) = spans.get_finished_spans()
    assert span.name == "chat m"
    assert span.attributes[catalog.A_GENAI_OUTPUT_TOKENS] == 5
    assert span.attributes[catalog.A_GENAI_INPUT_TOKENS] == PROMPT_TOKENS
    assert span.attributes[catalog.A_GENAI_FINISH_REASONS] == ("length",)
    assert span.attributes[catalog.A_REQUEST_ID] == request.request_id
    after = scrape(tel)
    name = "gen_ai_server_token_usage_sum"
    assert total(after, name, gen_ai_token_type="output") - total(
        before, name, gen_ai_token_type="output") == 5
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    assert total(after, ttft) - total(before, ttft) == 1
    tpot = "gen_ai_server_time_per_output_token_seconds_count"
    assert total(after, tpot) - total(before, tpot) == 1


def test_usage_the_client_asked_for_is_kept(tel: Telemetry, models: Any):
    observer = make_observer(tel, [child(NoRequestHooks)], models)
    request = chat_request(models, stream=True, stream_options={"include_usage": True})
    out = run(collect(observer.observe("chat", Engine(tokens=3).chat, request, None)))
    usage_chunks = [c for c in out if '"choices":[]' in c]
    assert len(usage_chunks) == 1 and '"completion_tokens":3' in usage_chunks[0]


def test_chunk_hooks_get_text_and_running_tokens_client_chunks_stay_clean(
    tel: Telemetry, models: Any
):
    observer = make_observer(tel, [child(ChunkRecorder, "rec")], models)
    rec = instance(observer, "rec")
    engine = Engine(tokens=3)
    request = chat_request(models, stream=True, user="alice")
    out = run(collect(observer.observe("chat", engine.chat, request, None)))

    assert engine.calls[0].stream_options.continuous_usage_stats is True
    assert not any('"usage"' in c for c in out)  # running usage stripped again
    chunks = [c for c in rec.calls if c[0] == "chunk"]
    assert [c[1] for c in chunks] == ["", "t1", "t2", "t3"]
    assert [c[2]["completion_tokens"] for c in chunks] == [0, 1, 2, 3]
    assert [c[2]["index"] for c in chunks] == [0, 1, 2, 3]
    (start,) = [c for c in rec.calls if c[0] == "start"]
    assert start[1][0]["content"] == "hi"
    assert start[2]["user"] == "alice" and start[2]["stream"] is True
    (end,) = [c for c in rec.calls if c[0] == "end"]
    assert end[1].text == "t1t2t3" and end[1].usage.completion_tokens == 3
    assert end[2]["completion_tokens"] == 3 and end[2]["prompt_tokens"] == PROMPT_TOKENS
    assert end[2]["chunks"] == 4 and end[2]["time_to_first_token_ms"] > 0
    m = scrape(tel)
    assert total(m, "llm_callback_hook_calls_total", callback="rec", hook="on_llm_stream_chunk",
                 outcome="ok") >= 4


def test_non_streaming_end_kwargs_match_usage(tel: Telemetry, models: Any):
    observer = make_observer(tel, [child(Recorder, "rec")], models)
    rec = instance(observer, "rec")
    out = run(collect(observer.observe("chat", Engine(tokens=2).chat, chat_request(models),
                                       None)))
    assert out[0].usage.completion_tokens == 2
    (end,) = [c for c in rec.calls if c[0] == "end"]
    assert end[1] is out[0]
    assert (end[2]["prompt_tokens"], end[2]["completion_tokens"]) == (PROMPT_TOKENS, 2)
    assert end[2]["time_to_first_token_ms"] is None and end[2]["stream"] is False


class SeedRequestOnly:
    """The seed request-callback API: a plain class, request hooks only, no startup hooks."""

    def __init__(self) -> None:
        self.ended: list[tuple[int | None, int | None]] = []
        self.chunks = 0

    async def on_llm_end(self, response: Any, **kw: Any) -> None:
        self.ended.append((kw["prompt_tokens"], kw["completion_tokens"]))

    def on_llm_stream_chunk(self, chunk: Any, **kw: Any) -> None:
        self.chunks += 1


def test_plain_class_with_only_request_hooks_is_a_child(tel: Telemetry, models: Any):
    observer = make_observer(tel, [child(SeedRequestOnly, "seed_req"), child(NoRequestHooks)],
                             models)
    assert [b.name for b in observer.hooks.end] == ["seed_req"]
    seed = instance(observer, "seed_req")
    out = run(collect(observer.observe("chat", Engine(tokens=3).chat,
                                       chat_request(models, stream=True), None)))
    assert out[-1] == "data: [DONE]\n\n"
    assert seed.ended == [(PROMPT_TOKENS, 3)]
    assert seed.chunks == 4  # the role chunk and three tokens
    # Its startup hooks are no-ops: a startup dispatch through the composite is fine.
    composite = Composite(callbacks=[child(SeedRequestOnly, "seed_req")])
    run(composite.run_callback("on_before_node_init"))


def test_a_plain_class_with_no_hook_at_all_is_refused_naming_the_field():
    class NoHooks:
        pass

    with pytest.raises(CallbackConfigError) as info:
        Composite(callbacks=[child(NoHooks, "empty")])
    assert "callbacks[0] (empty)" in str(info.value)
    assert "field 'callback_class'" in str(info.value)
    assert "on_llm_start" in str(info.value)


# --- policies ---------------------------------------------------------------------------------


def test_log_policy_failure_is_recorded_and_the_request_goes_on(
    tel: Telemetry, spans: InMemorySpanExporter, models: Any
):
    observer = make_observer(
        tel, [child(Boom, "flaky", raise_error_on_callback=False,
                    callback_kwargs={"where": "end"})], models,
    )
    before = scrape(tel)
    out = run(collect(observer.observe("chat", Engine().chat, chat_request(models), None)))
    assert out[0].usage is not None  # the response, not an error
    (span,) = spans.get_finished_spans()
    events = {e.name: e.attributes for e in span.events}
    assert events[catalog.EVENT_HOOK_ERROR][catalog.A_CALLBACK] == "flaky"
    assert "exception" in events
    key = {"callback": "flaky", "hook": "on_llm_end", "outcome": "error"}
    assert total(scrape(tel), "llm_callback_hook_calls_total", **key) - total(
        before, "llm_callback_hook_calls_total", **key) == 1


def test_raise_policy_failure_fails_the_request_naming_child_and_hook(
    tel: Telemetry, spans: InMemorySpanExporter, models: Any
):
    observer = make_observer(
        tel, [child(Boom, "strict", raise_error_on_callback=True,
                    callback_kwargs={"where": "start"})], models,
    )
    engine = Engine()
    (out,) = run(collect(observer.observe("chat", engine.chat, chat_request(models), None)))
    assert not engine.calls  # the engine never saw the request
    assert out.error.code == 500
    body = out.error.model_extra[RESPONSE_FIELD]["error"]
    assert "'strict'" in body["message"] and "on_llm_start" in body["message"]
    (span,) = spans.get_finished_spans()
    assert span.attributes[catalog.A_ERROR_TYPE] == "hook_error"


def test_timeout_is_an_outcome_not_a_failure_under_the_log_policy(tel: Telemetry, models: Any):
    observer = make_observer(
        tel, [child(Slow, "slow", raise_error_on_callback=False, timeout_s=0.05)], models
    )
    started = time.perf_counter()
    out = run(collect(observer.observe("chat", Engine().chat, chat_request(models), None)))
    assert time.perf_counter() - started < 2
    assert out[0].usage is not None
    assert total(scrape(tel), "llm_callback_hook_calls_total", callback="slow",
                 outcome="timeout") >= 1


def test_rejection_answers_429_and_is_counted(tel: Telemetry, models: Any):
    class Refuse(RayServeLLMCallback):
        def on_llm_start(self, prompt: Any, **kw: Any) -> None:
            raise RequestRejected("go away", reason="policy", retry_after_s=2.5)

    observer = make_observer(
        tel, [child(Recorder, "rec"), child(Refuse, "gate", raise_error_on_callback=False)],
        models,
    )
    rec = instance(observer, "rec")
    engine = Engine()
    before = scrape(tel)
    (out,) = run(collect(observer.observe("chat", engine.chat, chat_request(models, stream=True),
                                          None)))
    assert not engine.calls
    assert out.error.code == 429 and out.error.model_extra["retry_after_s"] == 2.5
    assert out.error.model_extra[RESPONSE_FIELD]["error"]["type"] == "policy"
    (err,) = [c for c in rec.calls if c[0] == "error"]
    assert isinstance(err[1], RequestRejected) and err[2]["status_code"] == 429
    key = {"callback": "gate", "reason": "policy"}
    assert total(scrape(tel), "llm_callback_requests_rejected_total", **key) - total(
        before, "llm_callback_requests_rejected_total", **key) == 1


def test_client_going_away_ends_the_span_as_cancelled(
    tel: Telemetry, spans: InMemorySpanExporter, models: Any
):
    observer = make_observer(tel, [child(Recorder, "rec")], models)
    rec = instance(observer, "rec")
    engine = Engine(tokens=10)

    async def read_two_then_leave() -> None:
        gen = observer.observe("chat", engine.chat, chat_request(models, stream=True), None)
        await gen.__anext__()
        await gen.__anext__()
        await gen.aclose()
        await asyncio.sleep(0.05)  # on_llm_error runs in the background

    run(read_two_then_leave())
    assert engine.closed  # the engine's stream was closed too (vLLM aborts the request)
    (span,) = spans.get_finished_spans()
    assert span.attributes[catalog.A_ERROR_TYPE] == catalog.ERROR_CANCELLED
    assert [c[0] for c in rec.calls] == ["start", "error"]


def test_engine_failure_mid_stream_reaches_on_llm_error(tel: Telemetry, models: Any):
    observer = make_observer(tel, [child(Recorder, "rec")], models)
    rec = instance(observer, "rec")
    with pytest.raises(RuntimeError, match="engine died"):
        run(collect(observer.observe("chat", Engine(fail_at=2).chat,
                                     chat_request(models, stream=True), None)))
    assert [c[0] for c in rec.calls] == ["start", "error"]


# --- built-ins --------------------------------------------------------------------------------


def limiter(**kwargs: Any) -> RateLimiter:
    return RateLimiter(**kwargs)


def test_rate_limiter_requests_window_and_retry_after():
    rl = limiter(requests_per_minute=2, key="user")
    now = [1000.0]
    rl.clock = lambda: now[0]

    async def start(user: str | None) -> None:
        await rl.on_llm_start("p", user=user)

    run(start("a"))
    now[0] += 10
    run(start("a"))
    run(start("b"))  # another key has its own budget
    with pytest.raises(RateLimitExceeded) as info:
        run(start("a"))
    assert info.value.reason == "requests" and info.value.status_code == 429
    assert info.value.retry_after_s == pytest.approx(50.0)  # the first one leaves at t=60
    now[0] += 50.001
    run(start("a"))
    run(start(None))  # anonymous: one shared budget by default
    run(start(None))
    with pytest.raises(RateLimitExceeded):
        run(start(None))


def test_rate_limiter_tokens_window_counts_finished_requests():
    rl = limiter(tokens_per_minute=100, key="api_key", anonymous="exempt")
    now = [0.0]
    rl.clock = lambda: now[0]

    async def go(key: str | None, used: int) -> None:
        await rl.on_llm_start("p", api_key_id=key)
        await rl.on_llm_end(None, api_key_id=key, prompt_tokens=used // 2,
                            completion_tokens=used - used // 2)

    run(go("k", 60))
    now[0] = 5
    run(go("k", 50))  # 110 >= 100 now
    now[0] = 6
    with pytest.raises(RateLimitExceeded) as info:
        run(go("k", 1))
    assert info.value.reason == "tokens"
    assert info.value.retry_after_s == pytest.approx(54.0)  # the first 60 tokens leave at t=60
    run(go(None, 1000))  # exempt without a key


def test_rate_limiter_needs_a_limit_and_names_the_field():
    with pytest.raises(CallbackConfigError, match="requests_per_minute"):
        RateLimiter()
    with pytest.raises(CallbackConfigError, match="key"):
        RateLimiter(requests_per_minute=1, key="ip")


def test_token_counter_and_cost_tracker(tel: Telemetry):
    counter = TokenCounter()
    cost = CostTracker(prices={"m": {"input": 1.0, "output": 3.0}}, currency="EUR")

    async def end() -> None:
        kw = {"model": "m", "prompt_tokens": 1000, "completion_tokens": 2000}
        await counter.on_llm_end(None, **kw)
        await cost.on_llm_end(None, **kw)
        await cost.on_llm_end(None, model="other", prompt_tokens=5, completion_tokens=5)

    run(end())
    assert counter.snapshot() == {"prompt_tokens": 1000, "completion_tokens": 2000,
                                  "total_tokens": 3000, "request_count": 1}
    assert cost.total_cost == pytest.approx((1000 * 1.0 + 2000 * 3.0) / 1e6)
    assert cost.request_count == 1  # "other" has no price
    with pytest.raises(CallbackConfigError, match="currency"):
        CostTracker(currency="euro")


def test_streaming_progress_events_and_gauge(tel: Telemetry, spans: InMemorySpanExporter,
                                             models: Any):
    observer = make_observer(tel, [child(StreamingProgress, callback_kwargs={"event_every": 2})],
                             models)
    run(collect(observer.observe("chat", Engine(tokens=5).chat,
                                 chat_request(models, stream=True), None)))
    (span,) = spans.get_finished_spans()
    progress = [e.attributes for e in span.events if e.name == catalog.EVENT_STREAM_PROGRESS]
    assert [p[catalog.A_PROGRESS_CHUNKS] for p in progress] == [2, 4, 6, 6]
    assert progress[-1][catalog.A_PROGRESS_TOKENS] == 5
    m = scrape(tel)
    assert total(m, "llm_callback_streams_active", model="m") == 0


# --- the ingress's answer and server_cls from YAML --------------------------------------------


def test_ingress_answers_a_rejection_with_retry_after(models: Any):
    from llm_otel_callbacks.serve._engine import make_error_response
    from llm_otel_callbacks.serve.ingress import _refusal_in

    rejection = RateLimitExceeded("requests", 5, retry_after_s=12.2)
    item = make_error_response(429, rejection.message, "requests",
                               {RESPONSE_FIELD: rejection.body(), "retry_after_s": 12.2})
    refusal = _refusal_in([item])  # streamed responses arrive in batches
    assert refusal is not None
    response = refusal.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "13"
    body = json.loads(response.body)
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    plain = make_error_response(400, "bad", "BadRequestError", {})
    assert _refusal_in(plain) is None


def test_yaml_server_cls_path_resolves_to_observed_llm_server():
    """The dotted path a YAML file gives resolves to our server class (test_serve_e2e's
    deployment, built from that path, shows Serve then runs it)."""
    import yaml
    from ray.serve.llm import LLMConfig

    from llm_otel_callbacks.serve import ObservedLLMServer

    config = LLMConfig.model_validate(yaml.safe_load("""
model_loading_config: {model_id: m, model_source: /nonexistent}
server_cls: llm_otel_callbacks.serve.ObservedLLMServer
callback_config:
  callback_class: llm_otel_callbacks.Composite
  callback_kwargs:
    callbacks:
      - llm_otel_callbacks.builtin.TokenCounter
      - {callback_class: llm_otel_callbacks.builtin.RateLimiter,
         callback_kwargs: {requests_per_minute: 10}}
"""))
    assert config.server_cls is ObservedLLMServer


def test_chunks_in_another_key_order_take_the_careful_path(tel: Telemetry, models: Any):
    from llm_otel_callbacks.serve._sse import CONTENT, DONE, ERROR, USAGE, kind_of

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    items = [
        'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"id":"x","model":"m"}\n\n',
        'data: {"model":"m","choices":[{"index":0,"delta":{"content":"b"}}],"id":"x"}\n\n',
        "data: " + json.dumps({"model": "m", "choices": [], "usage": usage}) + "\n\n",
        "data: [DONE]\n\n",
    ]
    assert [kind_of(i) for i in items] == [CONTENT, CONTENT, USAGE, DONE]
    assert kind_of('data: {"error": {"message": "x", "code": 400}}\n\n') == ERROR

    async def engine(request: Any, raw: Any = None) -> AsyncIterator[str]:
        for item in items:
            yield item

    observer = make_observer(tel, [child(Recorder, "rec")], models)
    rec = instance(observer, "rec")
    out = run(collect(observer.observe("chat", engine, chat_request(models, stream=True), None)))
    assert out == [items[0], items[1], items[3]]  # the usage chunk the client did not ask for
    (end,) = [c for c in rec.calls if c[0] == "end"]
    assert end[2]["chunks"] == 2 and end[2]["completion_tokens"] == 2


# --- the engine-start phase -------------------------------------------------------------------


class EngineHooks(RayServeLLMCallback):
    order: list[str] = []

    async def on_after_node_init(self) -> None:
        self.order.append("on_after_node_init")

    async def on_before_engine_start(self) -> None:
        self.order.append("on_before_engine_start")

    def on_after_engine_start(self) -> None:
        self.order.append("on_after_engine_start")


def test_engine_start_follows_node_init_and_closes_the_startup_trace(tmp_path: Any):
    from llm_otel_callbacks.serve._engine_start import EngineStart
    from llm_otel_callbacks.telemetry import reset_telemetry

    reset_telemetry()
    traces = tmp_path / "spans.jsonl"
    composite = Composite(
        callbacks=[child(EngineHooks, "hooks")],
        telemetry={"traces_file": str(traces), "metrics_backend": "prometheus"},
    )
    tel = composite._observer.tel
    phase = EngineStart(composite, "m", tel)
    assert phase.arm()

    async def like_ray_then_server() -> None:
        # What VLLMEngine.start() does before building vLLM, then what the server does after.
        await composite.run_callback("on_before_node_init")
        await composite.run_callback("on_after_node_init")
        EngineHooks.order.append("engine built")
        await phase.ready()

    EngineHooks.order = []
    run(like_ray_then_server())
    assert EngineHooks.order == ["on_after_node_init", "on_before_engine_start", "engine built",
                                 "on_after_engine_start"]
    tel.force_flush()
    spans = [
        s
        for line in traces.read_text().splitlines()
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
    ]
    by_name = {s["name"]: s for s in spans}
    startup = by_name[catalog.SPAN_STARTUP]
    engine = by_name[catalog.SPAN_ENGINE_START]
    assert engine["parentSpanId"] == startup["spanId"]
    assert engine["traceId"] == startup["traceId"]
    node_init = by_name[catalog.SPAN_HOOK_PREFIX + "on_after_node_init"]
    assert int(engine["startTimeUnixNano"]) >= int(node_init["endTimeUnixNano"])
    assert int(startup["endTimeUnixNano"]) >= int(engine["endTimeUnixNano"])
    assert catalog.SPAN_HOOK_PREFIX + "on_after_engine_start" in by_name
    reset_telemetry()


# --- a failing hook does not stop the cleanup of later children ------------------------------


class EndsBadly(RayServeLLMCallback):
    """Raise policy; its end and error hooks both raise."""

    async def on_llm_end(self, response: Any, **kw: Any) -> None:
        raise RuntimeError("end hook failed")

    async def on_llm_error(self, error: Any, **kw: Any) -> None:
        raise RuntimeError("error hook failed")


def test_every_child_gets_its_end_or_error_hook_after_one_raises(tel: Telemetry, models: Any):
    """Ahead of StreamingProgress, a child whose end/error hooks raise used to stop the rest:
    after 5 failed streams StreamingProgress held 5 open entries (streams_active read 5)."""
    observer = make_observer(
        tel, [child(EndsBadly, "bad"), child(StreamingProgress, "progress"),
              child(Recorder, "rec")], models,
    )
    progress, rec = instance(observer, "progress"), instance(observer, "rec")
    for _ in range(5):  # the engine fails mid-stream: on_llm_error for every child
        with pytest.raises(RuntimeError, match="engine died"):
            run(collect(observer.observe("chat", Engine(fail_at=2).chat,
                                         chat_request(models, stream=True), None)))
    for _ in range(3):  # the stream succeeds, the first child's on_llm_end raises
        run(collect(observer.observe("chat", Engine().chat,
                                     chat_request(models, stream=True), None)))
    from llm_otel_callbacks.builtin.progress import _STREAMS

    assert progress.process_cache[_STREAMS] == {}  # it saw the streams, and closed them all
    kinds = [c[0] for c in rec.calls]
    assert kinds.count("error") == 5 + 3 and kinds.count("end") == 3, kinds


# --- a hook's exception text stays inside ----------------------------------------------------

PLANTED = "sk-live-planted-9d1"


class LeakyBilling(RayServeLLMCallback):
    """Raise policy; fails with a key in the message where ``where`` says."""

    async def on_llm_start(self, prompt: Any, **kw: Any) -> None:
        if self.kwargs["where"] == "start":
            raise RuntimeError(f"POST https://billing.example/?key={PLANTED} failed")

    async def on_llm_end(self, response: Any, **kw: Any) -> None:
        if self.kwargs["where"] == "end":
            raise RuntimeError(f"POST https://billing.example/?key={PLANTED} failed")

    async def on_llm_error(self, error: Any, **kw: Any) -> None:
        raise ValueError(f"cleanup failed for key={PLANTED}")


@pytest.mark.parametrize("record_messages", [True, False])
def test_a_hooks_exception_text_reaches_no_client_and_obeys_the_setting(
    tel: Telemetry, spans: InMemorySpanExporter, models: Any,
    caplog: pytest.LogCaptureFixture, record_messages: bool,
):
    """The wiring ObservedLLMServer uses: the composite's settings reach the observer."""
    from llm_otel_callbacks.serve.server import _request_observer

    def observer_for(where: str) -> RequestObserver:
        composite = Composite(
            callbacks=[child(LeakyBilling, "billing", callback_kwargs={"where": where})],
            telemetry={"record_exception_messages": record_messages},
        )
        observer = _request_observer(composite, "m", tel, Engine())
        assert observer is not None
        return observer

    caplog.set_level(logging.DEBUG)
    (plain,) = run(collect(observer_for("start").observe(
        "chat", Engine().chat, chat_request(models), None)))
    body = plain.error.model_extra[RESPONSE_FIELD]["error"]["message"]
    assert body == "callback 'billing' failed in hook 'on_llm_start': RuntimeError"
    streamed = run(collect(observer_for("end").observe(
        "chat", Engine().chat, chat_request(models, stream=True), None)))
    errors = [json.loads(i[len("data: "):])["error"] for i in streamed
              if isinstance(i, str) and i.startswith('data: {"error"')]
    assert [e["message"] for e in errors] == [
        "callback 'billing' failed in hook 'on_llm_end': RuntimeError"], streamed
    assert PLANTED not in repr(plain) + repr(streamed)
    finished = spans.get_finished_spans()
    assert len(finished) == 2 and all(s.status.status_code.name == "ERROR" for s in finished)
    in_spans = any(PLANTED in repr((s.status.description, [(e.name, dict(e.attributes or {}))
                                                           for e in s.events]))
                   for s in finished)
    assert in_spans is record_messages
    assert (PLANTED in caplog.text) is record_messages
