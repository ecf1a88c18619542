"""ObservedLLMServer end to end: a real Ray Serve LLM app on the CPU with ``server_cls`` set.

One module-scoped deployment (about a minute to start) carries every check: real vLLM engine,
real HTTP requests through Serve's proxy and Ray's OpenAI ingress (our subclass of it), the
request hooks of a Composite's children, spans after a real OTLP/HTTP export to the in-test
receiver (Serve's own request tracing on, so our request spans must join its traces) and metrics
after a real scrape of Ray's metrics export port.

The classes below are composite children named by dotted path; the replica imports this module.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import RayServeLLMCallback, catalog
from llm_otel_callbacks.demo.serve_app import tiny_llm_config, wait_ready
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import LocalRay, free_port, scrape, start_local_ray, wait_for_metric

pytestmark = pytest.mark.e2e

MODEL = "tiny"
MAX_TOKENS = 6
_OTLP_ENV = "LLM_OTEL_E2E_SERVE_OTLP"  # where Serve's own tracing exports (this receiver)
# How the replica imports this module (pytest may import it under another name).
_HERE = "tests.test_serve_e2e"


# --- composite children used by the deployment (imported in the replica) ---------------------


class HookRecorder(RayServeLLMCallback):
    """Writes every engine/request hook call as one JSON line (the replica is another
    process); the tests read the file."""

    def _write(self, hook: str, **fields: Any) -> None:
        with open(self.kwargs["path"], "a") as fh:
            fh.write(json.dumps({"hook": hook, "pid": os.getpid(), **fields}, default=str) + "\n")

    async def on_before_engine_start(self) -> None:
        self._write("on_before_engine_start", t=time.time())

    async def on_after_engine_start(self) -> None:
        self._write("on_after_engine_start", t=time.time())

    async def on_llm_start(self, prompt: Any, **kwargs: Any) -> None:
        self._write("on_llm_start", prompt_type=type(prompt).__name__, **_plain(kwargs))

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        usage = getattr(response, "usage", None)
        self._write(
            "on_llm_end",
            response_type=type(response).__name__,
            response_prompt_tokens=getattr(usage, "prompt_tokens", None),
            response_completion_tokens=getattr(usage, "completion_tokens", None),
            streamed_text=getattr(response, "text", None),
            **_plain(kwargs),
        )

    async def on_llm_error(self, error: Any, **kwargs: Any) -> None:
        self._write("on_llm_error", error_type=type(error).__name__, error=str(error),
                    **_plain(kwargs))

    def on_llm_stream_chunk(self, chunk: Any, **kwargs: Any) -> None:
        self._write("on_llm_stream_chunk", chunk=chunk, **_plain(kwargs))


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in ("request", "raw")}


#: Planted in the strict child's errors: it must reach no client, span or log line.
SECRET = "sk-live-PLANTED-4f9c2e"


class StrictStart(RayServeLLMCallback):
    """Raise policy: fails on_llm_start for user 'explode', a streamed chunk for
    'explode-chunk' (the request must fail), with a billing URL and key in the message, as a
    real callback might."""

    async def on_llm_start(self, prompt: Any, **kwargs: Any) -> None:
        if kwargs.get("user") == "explode":
            raise RuntimeError(f"billing https://billing.example/charge?key={SECRET} refused")

    def on_llm_stream_chunk(self, chunk: Any, **kwargs: Any) -> None:
        if kwargs.get("user") == "explode-chunk":
            raise PermissionError(f"quota service said no to key={SECRET}")


class FlakyEnd(RayServeLLMCallback):
    """Log policy: always fails on_llm_end (requests must still succeed)."""

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        raise ValueError("flaky end")


def serve_span_processors() -> list[Any]:
    """Serve's tracing exporter hook: Serve's own spans go to the test's OTLP receiver."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = os.environ[_OTLP_ENV].rstrip("/") + "/v1/traces"
    return [BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500)]


# --- the deployment -----------------------------------------------------------------------------


class Deployment:
    def __init__(self, ray_run: LocalRay, rx: OtlpHttpReceiver, base: str, record: Path):
        self.ray = ray_run
        self.rx = rx
        self.base = base
        self.record = record
        self.usages: list[dict[str, int]] = []  # usage of every successful chat/completion

    def records(self, hook: str | None = None, request_id: str | None = None) -> list[dict]:
        if not self.record.exists():
            return []
        out = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [
            r for r in out
            if (hook is None or r["hook"] == hook)
            and (request_id is None or r.get("request_id") == request_id)
        ]

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
             ) -> Any:
        import httpx

        body = {"model": MODEL, **body}
        return httpx.post(self.base + path, json=body, headers=headers or {}, timeout=60)

    def stream(self, path: str, body: dict[str, Any]) -> tuple[str, list[str]]:
        """Returns (x-request-id, raw SSE data payloads)."""
        import httpx

        body = {"model": MODEL, "stream": True, **body}
        with httpx.stream("POST", self.base + path, json=body, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            request_id = resp.headers["x-request-id"]
            payloads = [
                line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")
            ]
        return request_id, payloads


def _wait_records(dep: Deployment, hook: str, request_id: str, timeout: float = 10) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = dep.records(hook, request_id)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Deployment]:
    from ray import serve
    from ray.serve.llm import build_openai_app

    from tests.conftest import VLLM_CPU_ENV, _ensure_ray_down

    _ensure_ray_down()
    tmp = tmp_path_factory.mktemp("serve-e2e")
    record = tmp / "hooks.jsonl"
    with OtlpHttpReceiver() as rx:
        # vLLM's own request tracing on too (its OTLP/HTTP exporter to the same receiver).
        env = {**VLLM_CPU_ENV, _OTLP_ENV: rx.endpoint,
               "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
        run = start_local_ray(tmp / "ray", num_cpus=4, env=env)
        try:
            port = free_port()
            serve.start(
                http_options={"host": "127.0.0.1", "port": port},
                tracing_config={
                    "enabled": True,
                    "exporter_import_path": f"{_HERE}:serve_span_processors",
                    "sampling_ratio": 1.0,
                },
            )
            children = [
                {"callback_class": "llm_otel_callbacks.builtin.Timing"},
                {"callback_class": "llm_otel_callbacks.builtin.TokenCounter"},
                {
                    "callback_class": "llm_otel_callbacks.builtin.CostTracker",
                    "callback_kwargs": {"prices": {MODEL: {"input": 1.0, "output": 2.0}}},
                },
                {
                    "name": "rpm",
                    "callback_class": "llm_otel_callbacks.builtin.RateLimiter",
                    "callback_kwargs": {"requests_per_minute": 2, "key": "user",
                                        "anonymous": "exempt"},
                },
                {
                    "name": "tpm",
                    "callback_class": "llm_otel_callbacks.builtin.RateLimiter",
                    "callback_kwargs": {"tokens_per_minute": 10, "key": "api_key",
                                        "anonymous": "exempt"},
                },
                {
                    "callback_class": "llm_otel_callbacks.builtin.StreamingProgress",
                    "callback_kwargs": {"event_every": 2},
                },
                {"callback_class": f"{_HERE}.HookRecorder",
                 "callback_kwargs": {"path": str(record)}},
                {"name": "strict", "callback_class": f"{_HERE}.StrictStart",
                 "raise_error_on_callback": True},
                {"name": "flaky", "callback_class": f"{_HERE}.FlakyEnd",
                 "raise_error_on_callback": False},
            ]
            llm_config = tiny_llm_config(
                tiny_model_dir,
                model_id=MODEL,
                env=env,
                # vLLM's own request tracing on, exporting to the same receiver.
                engine_kwargs={"otlp_traces_endpoint": rx.endpoint.rstrip("/") + "/v1/traces"},
                server_cls="llm_otel_callbacks.serve.ObservedLLMServer",
                callback_config={
                    "callback_class": "llm_otel_callbacks.Composite",
                    "callback_kwargs": {
                        "callbacks": children,
                        # Off: the planted secret must be in no exported span.
                        "telemetry": {"endpoint": rx.endpoint, "schedule_delay_ms": 200,
                                      "record_exception_messages": False},
                    },
                },
            )
            app = build_openai_app({
                "llm_configs": [llm_config],
                "ingress_cls_config": {
                    "ingress_cls": "llm_otel_callbacks.serve.ObservedOpenAiIngress"
                },
            })
            serve.run(app, blocking=False)
            wait_ready(f"http://127.0.0.1:{port}", 300)
            yield Deployment(run, rx, f"http://127.0.0.1:{port}", record)
        finally:
            try:
                serve.shutdown()
            finally:
                run.shutdown()


def _user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


def _chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "hello there model"}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "user": _user(),
        **extra,
    }


def _completion_body(**extra: Any) -> dict[str, Any]:
    return {"prompt": "the quick brown fox", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "user": _user(), **extra}


# --- requests and hooks -----------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", _chat_body), ("/v1/completions", _completion_body),
])
def test_non_streaming_hooks_see_the_responses_usage(dep: Deployment, path: str, body: Any):
    resp = dep.post(path, body())
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    dep.usages.append(usage)
    request_id = resp.headers["x-request-id"]

    (end,) = _wait_records(dep, "on_llm_end", request_id)
    (start,) = dep.records("on_llm_start", request_id)
    assert start["model"] == MODEL and start["stream"] is False
    assert start["prompt_type"] == ("list" if "chat" in path else "str")
    assert len(start["trace_id"]) == 32
    assert end["prompt_tokens"] == usage["prompt_tokens"] == end["response_prompt_tokens"]
    assert end["completion_tokens"] == usage["completion_tokens"] == MAX_TOKENS
    assert end["total_tokens"] == usage["total_tokens"]
    assert end["duration_ms"] > 0 and end["time_to_first_token_ms"] is None
    assert end["trace_id"] == start["trace_id"]
    assert not dep.records("on_llm_stream_chunk", request_id)
    # The CostTracker listed before the recorder passed the request's cost on (seed 004).
    assert end["cost"] == pytest.approx(
        (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6)


@pytest.mark.parametrize("path,body,text_of", [
    ("/v1/chat/completions", _chat_body, lambda c: c["delta"].get("content") or ""),
    ("/v1/completions", _completion_body, lambda c: c.get("text") or ""),
])
def test_streaming_hooks_chunks_and_usage(dep: Deployment, path: str, body: Any, text_of: Any):
    # The client asks for no usage: the usage the server asked the engine for must not leak.
    request_id, payloads = dep.stream(path, body())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c or c["usage"] is None for c in chunks), chunks[-1]
    content = [c for c in chunks if c.get("choices")]
    streamed_text = "".join(text_of(c["choices"][0]) for c in content)

    (end,) = _wait_records(dep, "on_llm_end", request_id)
    assert end["stream"] is True and end["response_type"] == "StreamedResponse"
    assert end["completion_tokens"] == MAX_TOKENS  # ignore_eos: exactly max_tokens
    assert end["prompt_tokens"] > 0
    assert end["chunks"] == len(content)
    assert end["streamed_text"] == streamed_text
    assert 0 < end["time_to_first_token_ms"] <= end["duration_ms"]
    dep.usages.append({"prompt_tokens": end["prompt_tokens"],
                       "completion_tokens": end["completion_tokens"]})

    calls = dep.records("on_llm_stream_chunk", request_id)
    assert [c["index"] for c in calls] == list(range(len(content)))
    assert "".join(c["chunk"] for c in calls) == streamed_text
    tokens = [c["completion_tokens"] for c in calls if c["completion_tokens"] is not None]
    assert tokens == sorted(tokens) and tokens[-1] == MAX_TOKENS  # running token progress


def test_streaming_usage_the_client_asked_for_matches_the_hooks(dep: Deployment):
    request_id, payloads = dep.stream(
        "/v1/chat/completions", _chat_body(stream_options={"include_usage": True})
    )
    usage_chunks = [json.loads(p) for p in payloads[:-1] if '"usage"' in p]
    usage = next(c["usage"] for c in usage_chunks if c.get("usage") and not c.get("choices"))
    (end,) = _wait_records(dep, "on_llm_end", request_id)
    assert (end["prompt_tokens"], end["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"]
    )
    dep.usages.append(usage)


def test_rate_limiter_requests_per_minute_answers_429_with_retry_after(dep: Deployment):
    body = _chat_body(user="burst")
    codes = [dep.post("/v1/chat/completions", body) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429], codes[-1].text
    dep.usages.extend(r.json()["usage"] for r in codes[:2])
    refused = codes[2]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 60
    error = refused.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "2 requests per minute" in error["message"]
    (err,) = _wait_records(dep, "on_llm_error", refused.headers["x-request-id"])
    assert err["error_type"] == "RateLimitExceeded" and err["status_code"] == 429


def test_rate_limiter_tokens_per_minute_by_api_key(dep: Deployment):
    headers = {"Authorization": f"Bearer sk-test-{uuid.uuid4().hex}"}
    first = dep.post("/v1/completions", _completion_body(), headers)
    assert first.status_code == 200, first.text
    dep.usages.append(first.json()["usage"])  # more than the 10-token budget
    second = dep.post("/v1/completions", _completion_body(), headers)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "tokens"
    assert int(second.headers["retry-after"]) >= 1
    other_key = dep.post("/v1/completions", _completion_body(),
                         {"Authorization": "Bearer sk-someone-else"})
    assert other_key.status_code == 200  # budgets are per key
    dep.usages.append(other_key.json()["usage"])


def test_raise_policy_fails_the_request_naming_child_and_hook(dep: Deployment):
    resp = dep.post("/v1/chat/completions", _chat_body(user="explode"))
    assert resp.status_code == 500
    message = resp.json()["error"]["message"]
    assert message == "callback 'strict' failed in hook 'on_llm_start': RuntimeError"


def test_a_hooks_exception_text_reaches_no_client_span_or_log(dep: Deployment):
    """A raise-policy hook fails with a key in its message, in a plain request (at start)
    and in a streamed one (on a chunk): the clients see callback, hook and error type only;
    with record_exception_messages off, no exported span and no log line of the session has
    it."""
    resp = dep.post("/v1/chat/completions", _chat_body(user="explode"))
    assert resp.status_code == 500, resp.text
    assert resp.json()["error"]["message"] == (
        "callback 'strict' failed in hook 'on_llm_start': RuntimeError")
    request_id, payloads = dep.stream("/v1/chat/completions", _chat_body(user="explode-chunk"))
    errors = [json.loads(p)["error"] for p in payloads if p.startswith('{"error"')]
    assert [e["message"] for e in errors] == [
        "callback 'strict' failed in hook 'on_llm_stream_chunk': PermissionError"], payloads
    for body in (resp.text, "\n".join(payloads)):
        assert SECRET not in body and "billing.example" not in body, body

    def has_streamed_failure(spans: list[ReceivedSpan]) -> bool:
        return any(s.attributes.get(catalog.A_REQUEST_ID) == request_id
                   and s.status_code == "STATUS_CODE_ERROR" for s in spans)

    spans = dep.rx.wait_for_spans(has_streamed_failure, timeout=30)
    failed = [s for s in spans if s.attributes.get(catalog.A_REQUEST_ID) == request_id]
    assert failed and failed[0].status_message == "hook_error"  # the type, not the message
    leaks = [s.name for s in dep.rx.spans() if SECRET in repr(s)]
    assert not leaks, leaks
    logs = [p for p in dep.ray.logs_dir.rglob("*") if p.is_file()]
    assert logs
    leaked_logs = [p.name for p in logs if SECRET.encode() in p.read_bytes()]
    assert not leaked_logs, leaked_logs


def test_serve_runs_the_observed_server_named_by_its_dotted_path(dep: Deployment):
    """server_cls given as the dotted path a YAML file holds: Serve deploys our server."""
    from ray import serve

    deployments = {name for app in serve.status().applications.values()
                   for name in app.deployments}
    assert f"ObservedLLMServer:{MODEL}" in deployments, deployments


def test_embeddings_error_reaches_on_llm_error(dep: Deployment):
    # The tiny model is a generator: the engine answers embeddings with an error response.
    resp = dep.post("/v1/embeddings", {"input": "hello", "user": _user()})
    assert resp.status_code >= 400
    request_id = resp.headers["x-request-id"]
    errors = _wait_records(dep, "on_llm_error", request_id)
    starts = dep.records("on_llm_start", request_id)
    # The request reached the server's hooks (the ingress did not refuse it on its own).
    assert [s["operation"] for s in starts] == ["embeddings"], starts
    assert len(errors) == 1 and errors[0]["status_code"] == resp.status_code, errors


# --- spans ------------------------------------------------------------------------------------


def _spans_named(dep: Deployment, name: str, timeout: float = 20) -> list[ReceivedSpan]:
    spans = dep.rx.wait_for_spans(lambda ss: any(s.name == name for s in ss), timeout)
    return [s for s in spans if s.name == name]


def test_request_spans_follow_genai_conventions_and_join_serves_trace(dep: Deployment):
    resp = dep.post("/v1/chat/completions", _chat_body())
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    dep.usages.append(usage)
    request_id = resp.headers["x-request-id"]

    def mine(spans: list[ReceivedSpan]) -> bool:
        return any(s.attributes.get(catalog.A_REQUEST_ID) == request_id for s in spans)

    spans = dep.rx.wait_for_spans(mine, timeout=20)
    span = next(s for s in spans if s.attributes.get(catalog.A_REQUEST_ID) == request_id)
    assert span.name == f"chat {MODEL}" and span.kind == "SPAN_KIND_SERVER"
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.provider.name"] == "vllm"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a[catalog.A_COST] == pytest.approx(
        (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    )
    # The log-policy child's failure is on the span; the request still succeeded.
    errors = [e for e in span.events if e[0] == catalog.EVENT_HOOK_ERROR]
    assert errors and errors[0][1][catalog.A_CALLBACK] == "flaky"
    assert span.status_code != "STATUS_CODE_ERROR"
    # Joined to Serve's request trace: the parent is a span Serve exported, same trace.
    assert span.parent_span_id
    by_id = {s.span_id: s for s in dep.rx.spans()}
    deadline = time.monotonic() + 10
    while span.parent_span_id not in by_id and time.monotonic() < deadline:
        time.sleep(0.2)
        by_id = {s.span_id: s for s in dep.rx.spans()}
    parent = by_id[span.parent_span_id]
    assert parent.trace_id == span.trace_id and parent.scope_name != span.scope_name


def test_vllm_request_span_is_a_child_of_our_request_span(dep: Deployment):
    """vLLM's request tracing is on (otlp_traces_endpoint): its llm_request span, with queue,
    prefill and decode times, hangs under our request span, which hangs under Serve's."""
    resp = dep.post("/v1/chat/completions", _chat_body())
    assert resp.status_code == 200
    dep.usages.append(resp.json()["usage"])
    request_id = resp.headers["x-request-id"]

    def both(spans: list[ReceivedSpan]) -> bool:
        ours = [s for s in spans if s.attributes.get(catalog.A_REQUEST_ID) == request_id]
        return bool(ours) and any(s.parent_span_id == ours[0].span_id for s in spans)

    spans = dep.rx.wait_for_spans(both, timeout=20)
    ours = next(s for s in spans if s.attributes.get(catalog.A_REQUEST_ID) == request_id)
    (engine,) = [s for s in spans if s.parent_span_id == ours.span_id]
    assert engine.name == "llm_request" and engine.trace_id == ours.trace_id
    assert request_id in engine.attributes["gen_ai.request.id"]  # vLLM's id for the request
    for key in ("gen_ai.latency.time_in_queue", "gen_ai.latency.time_in_model_prefill",
                "gen_ai.latency.time_in_model_decode"):
        assert engine.attributes[key] >= 0, key
    assert ours.parent_span_id  # and ours is under Serve's ingress span


def test_streaming_span_has_progress_events(dep: Deployment):
    request_id, _ = dep.stream("/v1/chat/completions", _chat_body())
    (end,) = _wait_records(dep, "on_llm_end", request_id)
    dep.usages.append({"prompt_tokens": end["prompt_tokens"],
                       "completion_tokens": end["completion_tokens"]})
    spans = dep.rx.wait_for_spans(
        lambda ss: any(s.attributes.get(catalog.A_REQUEST_ID) == request_id for s in ss), 20
    )
    span = next(s for s in spans if s.attributes.get(catalog.A_REQUEST_ID) == request_id)
    progress = [e[1] for e in span.events if e[0] == catalog.EVENT_STREAM_PROGRESS]
    assert progress, span.events
    assert progress[-1][catalog.A_PROGRESS_TOKENS] == MAX_TOKENS
    assert span.attributes[catalog.A_STREAM] is True
    assert span.attributes[catalog.A_TTFT] > 0
    # Each request-hook call is an event (stream chunks: one per callback and stream).
    calls = {(e[1][catalog.A_HOOK], e[1][catalog.A_CALLBACK]): e[1] for e in span.events
             if e[0] == catalog.EVENT_HOOK_CALL}
    for hook in ("on_llm_start", "on_llm_end"):
        assert calls[(hook, "HookRecorder")][catalog.A_OUTCOME] == "ok"
    chunk_calls = calls[("on_llm_stream_chunk", "HookRecorder")]
    assert chunk_calls[catalog.A_HOOK_CALLS] == len(dep.records("on_llm_stream_chunk",
                                                                request_id))
    assert chunk_calls[catalog.A_HOOK_SECONDS] > 0


def test_startup_trace_contains_the_engine_start(dep: Deployment):
    startup = _spans_named(dep, catalog.SPAN_STARTUP)[0]
    engine = _spans_named(dep, catalog.SPAN_ENGINE_START)[0]
    assert engine.trace_id == startup.trace_id
    assert engine.parent_span_id == startup.span_id
    assert startup.end_time_unix_nano >= engine.end_time_unix_nano
    trace = [s for s in dep.rx.spans() if s.trace_id == startup.trace_id]
    names = {s.name for s in trace}
    for hook in ("on_before_engine_start", "on_after_engine_start", "on_after_node_init"):
        assert catalog.SPAN_HOOK_PREFIX + hook in names, names
    assert catalog.SPAN_PHASE_PREFIX + catalog.PHASE_ENGINE_START in names  # Timing's phase
    node_init_end = max(
        s.end_time_unix_nano for s in trace
        if s.name == catalog.SPAN_HOOK_PREFIX + "on_after_node_init"
    )
    assert engine.start_time_unix_nano >= node_init_end  # the phase starts after node init
    (before,) = dep.records("on_before_engine_start")
    (after,) = dep.records("on_after_engine_start")
    assert before["t"] <= after["t"]


# --- metrics ----------------------------------------------------------------------------------


def _total(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(v for lab, v in samples if all(lab.get(k) == x for k, x in labels.items()))


def test_genai_metrics_after_a_real_scrape(dep: Deployment):
    url = dep.ray.metrics_url
    done = len(dep.usages)
    out_tokens = sum(u["completion_tokens"] for u in dep.usages)

    def settled(samples: list[tuple[dict[str, str], float]]) -> bool:
        return _total(samples, token_type="output") >= out_tokens

    wait_for_metric(url, "ray_llm_callback_tokens_total", settled, timeout=60)
    time.sleep(2)  # one more report interval, so every series has caught up
    m = scrape(url)
    ok = [(lab, v) for lab, v in m["ray_gen_ai_server_request_duration_seconds_count"]
          if lab.get("error_type", "") == ""]
    assert sum(v for _, v in ok) == done
    assert {lab["gen_ai_operation_name"] for lab, _ in ok} == {"chat", "text_completion"}
    # Exact token totals come from counters: Ray exports a histogram's _sum from bucket
    # midpoints. The histogram's buckets still pin every value: all outputs were 6 tokens.
    assert _total(m["ray_llm_callback_tokens_total"], token_type="output") == out_tokens
    assert _total(m["ray_llm_callback_tokens_total"], token_type="input") == sum(
        u["prompt_tokens"] for u in dep.usages
    )
    buckets = [(lab, v) for lab, v in m["ray_gen_ai_server_token_usage_bucket"]
               if lab.get("gen_ai_token_type") == "output"]
    assert sum(v for lab, v in buckets if float(lab["le"]) == 4) == 0
    assert sum(v for lab, v in buckets if float(lab["le"]) == 16) == done
    assert _total(m["ray_gen_ai_server_token_usage_count"], gen_ai_token_type="input") == done
    assert _total(m["ray_gen_ai_server_time_to_first_token_seconds_count"]) >= 4
    assert _total(m["ray_gen_ai_server_time_per_output_token_seconds_count"]) >= 4
    assert _total(m["ray_gen_ai_server_request_duration_seconds_count"],
                  error_type="RateLimitExceeded") >= 2
    assert _total(m["ray_llm_callback_requests_rejected_total"], reason="requests") >= 1
    assert _total(m["ray_llm_callback_requests_rejected_total"], reason="tokens") >= 1
    assert _total(m["ray_llm_callback_cost_total"], currency="USD") > 0
    assert _total(m["ray_llm_callback_hook_calls_total"], callback="flaky", hook="on_llm_end",
                  outcome="error") == done
    assert _total(m["ray_llm_callback_hook_calls_total"], callback="HookRecorder",
                  hook="on_llm_stream_chunk", outcome="ok") > 0
    # Request-hook calls are timed like startup hooks.
    assert _total(m["ray_llm_callback_hook_duration_seconds_count"], callback="HookRecorder",
                  hook="on_llm_end", outcome="ok") >= done
    assert _total(m["ray_llm_callback_hook_duration_seconds_count"], callback="flaky",
                  hook="on_llm_end", outcome="error") == done
    assert _total(m["ray_llm_callback_startup_phase_duration_seconds_count"],
                  phase="engine_start") == 1
    # Request ids are span attributes only, never label values.
    ids = {r.get("request_id") for r in dep.records() if r.get("request_id")}
    for name, samples in m.items():
        if "gen_ai" in name or "llm_callback" in name:
            for labels, _ in samples:
                assert not ids & set(labels.values()), (name, labels)


# --- engine start, inside vLLM's processes (the vllm.general_plugins entry point) --------------

# What vLLM 0.29's CPU build gives with enforce_eager (no torch.compile, no CUDA graphs).
ENGINE_PHASES_VLLM_0_29_CPU = {
    catalog.ROLE_REPLICA: {catalog.PHASE_ENGINE_CONFIG, catalog.PHASE_ENGINE_FRONTEND_READY},
    catalog.ROLE_ENGINE_CORE: {
        catalog.PHASE_ENGINE_CORE_BOOT, catalog.PHASE_ENGINE_WORKERS_START,
        catalog.PHASE_ENGINE_KV_CACHE, catalog.PHASE_ENGINE_CORE_SETUP,
    },
    catalog.ROLE_WORKER: {
        catalog.PHASE_WORKER_BOOT, catalog.PHASE_WORKER_INIT, catalog.PHASE_WORKER_DEVICE_INIT,
        catalog.PHASE_WORKER_WEIGHTS_LOAD, catalog.PHASE_WORKER_KV_PROFILE,
        catalog.PHASE_WORKER_KV_ALLOCATE, catalog.PHASE_WORKER_WARMUP,
    },
}


def _engine_phase_spans(dep: Deployment) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    engine = _spans_named(dep, catalog.SPAN_ENGINE_START)[0]
    want = sum(len(v) for v in ENGINE_PHASES_VLLM_0_29_CPU.values())

    def arrived(spans: list[ReceivedSpan]) -> bool:
        return sum(
            1 for s in spans
            if s.parent_span_id == engine.span_id and catalog.A_ENGINE_ROLE in s.attributes
        ) >= want

    spans = dep.rx.wait_for_spans(arrived, 20)
    phases = [
        s for s in spans
        if s.parent_span_id == engine.span_id and catalog.A_ENGINE_ROLE in s.attributes
    ]
    return engine, phases


def test_engine_phases_from_vllm_processes_join_the_startup_trace(dep: Deployment):
    engine, phases = _engine_phase_spans(dep)
    replica = [s for s in phases if s.attributes[catalog.A_ENGINE_ROLE] == catalog.ROLE_REPLICA]
    replica_pid = replica[0].attributes[catalog.A_PID]
    node = replica[0].attributes[catalog.A_NODE_ID]
    assert node and replica_pid == dep.records("on_before_engine_start")[0]["pid"]
    by_role: dict[str, set[str]] = {}
    for s in phases:
        assert s.trace_id == engine.trace_id
        assert s.name == catalog.SPAN_PHASE_PREFIX + s.attributes[catalog.A_PHASE]
        assert s.status_code != "STATUS_CODE_ERROR", s
        assert s.attributes[catalog.A_NODE_ID] == node
        by_role.setdefault(s.attributes[catalog.A_ENGINE_ROLE], set()).add(
            s.attributes[catalog.A_PHASE]
        )
    # The phases vLLM 0.29 gives, each once (one engine core, one worker of rank 0).
    assert by_role == ENGINE_PHASES_VLLM_0_29_CPU
    assert len(phases) == sum(len(v) for v in ENGINE_PHASES_VLLM_0_29_CPU.values())
    vllm_pids = {
        s.attributes[catalog.A_PID] for s in phases
        if s.attributes[catalog.A_ENGINE_ROLE] != catalog.ROLE_REPLICA
    }
    assert len(vllm_pids) >= 2 and replica_pid not in vllm_pids  # engine core + worker
    for s in phases:  # each vLLM process exported its own spans (vLLM's tracing is on here,
        # so they went through the provider vLLM installed there, which is reused)
        if s.attributes[catalog.A_ENGINE_ROLE] != catalog.ROLE_REPLICA:
            resource = s.resource_attributes
            assert s.attributes[catalog.A_PID] == int(
                resource.get("process.pid", resource.get("vllm.process_id", -1))
            )
    workers = [s for s in phases if s.attributes[catalog.A_ENGINE_ROLE] == catalog.ROLE_WORKER]
    assert {s.attributes[catalog.A_ENGINE_RANK] for s in workers} == {0}
    (weights,) = [s for s in workers
                  if s.attributes[catalog.A_PHASE] == catalog.PHASE_WORKER_WEIGHTS_LOAD]
    assert weights.attributes[catalog.A_WEIGHTS_BYTES] > 100_000  # ~146k float32 parameters


def test_engine_phases_explain_the_engine_start(dep: Deployment):
    from llm_otel_callbacks.vllm_plugin._replica import Interval, coverage

    engine, phases = _engine_phase_spans(dep)
    share = coverage(
        [Interval(s.name, s.start_time_unix_nano, s.end_time_unix_nano) for s in phases],
        engine.start_time_unix_nano, engine.end_time_unix_nano,
    )
    print(f"\nengine start {engine.duration_s:.1f}s; the phases explain {share:.1%} of it")
    for s in sorted(phases, key=lambda s: s.start_time_unix_nano):
        print(f"  {s.attributes[catalog.A_ENGINE_ROLE]:12s} {s.attributes[catalog.A_PHASE]:28s}"
              f" +{(s.start_time_unix_nano - engine.start_time_unix_nano) / 1e9:6.2f}s"
              f" {s.duration_s:6.2f}s")
    assert share >= 0.80
    # The replica computed the same figure and put it on its engine-start span.
    assert engine.attributes[catalog.A_PHASE_COVERAGE] == pytest.approx(share, abs=0.002)


def test_engine_phases_in_the_startup_phase_metric_after_a_real_scrape(dep: Deployment):
    want = set().union(*ENGINE_PHASES_VLLM_0_29_CPU.values())
    name = "ray_llm_callback_startup_phase_duration_seconds_count"

    def settled(samples: list[tuple[dict[str, str], float]]) -> bool:
        return want <= {lab.get("phase") for lab, _ in samples}

    wait_for_metric(dep.ray.metrics_url, name, settled, timeout=60)
    samples = scrape(dep.ray.metrics_url)[name]
    for phase in want:  # one point each: one engine core, one worker
        assert _total(samples, phase=phase, outcome="ok") == 1, phase
        (node,) = {lab["node"] for lab, _ in samples if lab.get("phase") == phase}
        assert node  # the replica's node, as for the other phases
