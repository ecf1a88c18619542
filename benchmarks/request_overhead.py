"""What ObservedLLMServer costs per request and per streamed chunk, in one run.

Two parts:

1. ``micro`` (no Ray, seconds): the request observer around an engine generator that yields
   realistic vLLM chunks with no work in between, against iterating that generator bare. The
   difference is the observer's own cost: microseconds per streamed chunk and per request, with
   the GenAI span (real SDK tracer, batch processor, discarding exporter) and metrics
   (prometheus_client) on. Cases: a Composite whose children implement no request hook, one with
   TokenCounter (``on_llm_end`` only), one with StreamingProgress (``on_llm_stream_chunk``: the
   chunks get parsed, shown for contrast).
2. ``serve`` (minutes): the same tiny model on the real CPU vLLM engine behind Ray Serve, in
   one Ray: Ray's plain ``LLMServer`` stays deployed while the observed variants are deployed
   beside it one after the other (``ObservedLLMServer`` with a Composite implementing no request
   hook, then with TokenCounter), so at most two engines run at once. Each pair is loaded in
   alternating rounds (plain, observed, observed, plain, ...) by ``--concurrency`` clients
   sending half streamed, half non-streamed chat requests of ``--max-tokens`` tokens (greedy,
   ignore_eos) for ``--seconds`` per round; the ratio is the median of the per-pair throughput
   ratios, which a shared machine's drift affects least. Spans go to an OTLP/HTTP receiver in
   a process of its own.

Run: ``python benchmarks/request_overhead.py [micro|serve|all] [--out result.json]``.
Goals: serve throughput ratio >= 0.98 with no request hooks; <= 1 us per streamed chunk when no
child implements ``on_llm_stream_chunk``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "tiny"


# --- part 1: micro ------------------------------------------------------------------------------


def _chunk(i: int, n: int) -> str:
    choice = {"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None,
              "finish_reason": "length" if i == n - 1 else None}
    body = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk",
            "created": 1700000000, "model": MODEL, "choices": [choice]}
    return "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"


class _Engine:
    """Yields pre-built chunks as fast as possible: only the observer's cost remains."""

    def __init__(self, chunks: int) -> None:
        self.body = [_chunk(i, chunks) for i in range(chunks)]
        usage = {"prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": 9 + chunks}
        self.usage = "data: " + json.dumps(
            {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk",
             "created": 1700000000, "model": MODEL, "choices": [], "usage": usage},
            separators=(",", ":"),
        ) + "\n\n"
        self.response: Any = None

    async def chat(self, request: Any, raw: Any = None) -> AsyncIterator[Any]:
        if not request.stream:
            yield self.response
            return
        for item in self.body:
            yield item
        opts = request.stream_options
        if opts is not None and opts.include_usage:
            yield self.usage
        yield "data: [DONE]\n\n"


def _observer(children: list[Any]) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from llm_otel_callbacks import Composite, catalog
    from llm_otel_callbacks._request_hooks import RequestHooks
    from llm_otel_callbacks.serve._engine import engine_error_types, make_error_response
    from llm_otel_callbacks.serve._requests import RequestObserver
    from llm_otel_callbacks.telemetry import TelemetrySettings
    from llm_otel_callbacks.telemetry.providers import Telemetry

    class Discard(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tel = Telemetry(TelemetrySettings.resolve({"metrics_backend": "prometheus"}, environ={}))
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=1 << 16))
    tel.tracer = provider.get_tracer("bench")
    composite = Composite(callbacks=children)
    hooks = RequestHooks(composite.hook_targets(), tel.recorder(catalog.HOOK_CALLS), MODEL)
    return RequestObserver(model=MODEL, provider="vllm", tel=tel, hooks=hooks,
                           error_response=make_error_response,
                           error_types=engine_error_types())


async def _drain(gen: AsyncIterator[Any]) -> None:
    async for _ in gen:
        pass


def _time(fn: Any, repeat: int) -> float:
    """Best of ``repeat`` runs of ``fn()`` (an awaitable factory), in seconds."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        asyncio.run(fn())
        best = min(best, time.perf_counter() - start)
    return best


def micro(chunks: int, requests: int, repeat: int) -> dict[str, Any]:
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        ChatCompletionResponse,
    )

    cases = {
        "no request hooks": [{"callback_class": "llm_otel_callbacks.builtin.Timing"}],
        "TokenCounter": ["llm_otel_callbacks.builtin.Timing",
                         "llm_otel_callbacks.builtin.TokenCounter"],
        "StreamingProgress (chunk hook)": ["llm_otel_callbacks.builtin.StreamingProgress"],
    }
    engine = _Engine(chunks)
    engine.response = ChatCompletionResponse.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25},
    })

    def request(stream: bool) -> Any:
        return ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                     stream=stream, max_tokens=16)

    stream_req = request(True)
    bare_stream = _time(lambda: _drain(engine.chat(stream_req)), repeat)
    once = [request(False) for _ in range(requests)]

    async def bare_requests() -> None:
        for r in once:
            await _drain(engine.chat(r))

    bare_once = _time(bare_requests, repeat)
    out: dict[str, Any] = {"chunks_per_stream": chunks, "requests": requests, "cases": {}}
    for name, children in cases.items():
        observer = _observer(children)

        async def observed_stream(observer: Any = observer) -> None:
            await _drain(observer.observe("chat", engine.chat, request(True), None))

        async def observed_requests(observer: Any = observer) -> None:
            for r in once:
                await _drain(observer.observe("chat", engine.chat, r, None))

        per_stream = _time(observed_stream, repeat)
        per_requests = _time(observed_requests, repeat)
        out["cases"][name] = {
            "us_per_chunk": (per_stream - bare_stream) / chunks * 1e6,
            "us_per_request": (per_requests - bare_once) / requests * 1e6,
        }
    out["bare_us_per_chunk"] = bare_stream / chunks * 1e6
    return out


# --- part 2: serve ------------------------------------------------------------------------------

PLAIN = "plain LLMServer"
VARIANTS: dict[str, dict[str, Any]] = {
    PLAIN: {"server_cls": None, "children": ["llm_otel_callbacks.builtin.Timing"]},
    "ObservedLLMServer, no request hooks": {
        "server_cls": "llm_otel_callbacks.serve.ObservedLLMServer",
        "children": ["llm_otel_callbacks.builtin.Timing"],
    },
    "ObservedLLMServer, TokenCounter": {
        "server_cls": "llm_otel_callbacks.serve.ObservedLLMServer",
        "children": ["llm_otel_callbacks.builtin.Timing",
                     "llm_otel_callbacks.builtin.TokenCounter"],
    },
}


async def _load(base: str, concurrency: int, seconds: float, max_tokens: int
                ) -> tuple[int, int]:
    """Closed-loop load for ``seconds``: returns (requests ok, errors)."""
    import httpx

    deadline = time.perf_counter() + seconds
    done = errors = 0

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        nonlocal done, errors
        turn = index
        while time.perf_counter() < deadline:
            turn += 1
            stream = turn % 2 == 0
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hello model"}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": stream}
            try:
                if stream:
                    async with client.stream("POST", base + "/v1/chat/completions",
                                             json=body) as resp:
                        ok = resp.status_code == 200
                        async for _ in resp.aiter_lines():
                            pass
                else:
                    resp = await client.post(base + "/v1/chat/completions", json=body)
                    ok = resp.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                done += 1
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
    return done, errors


def _deploy(variant: str, app: str, model_dir: Path, endpoint: str, env: dict[str, str]) -> None:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    spec = VARIANTS[variant]
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": MODEL, "model_source": str(model_dir)},
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "engine_kwargs": {"max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 256,
                          "enforce_eager": True, "dtype": "float32"},
        "deployment_config": {"num_replicas": 1},
        "experimental_configs": {"num_ingress_replicas": 1},
        "runtime_env": {"env_vars": dict(env)},
        "callback_config": {
            "callback_class": "llm_otel_callbacks.Composite",
            "callback_kwargs": {"callbacks": spec["children"],
                                "telemetry": {"endpoint": endpoint}},
        },
    }
    if spec["server_cls"]:
        config["server_cls"] = spec["server_cls"]
    serve.run(build_openai_app({"llm_configs": [LLMConfig(**config)]}), blocking=False,
              name=app, route_prefix=f"/{app}")


def _wait_ready(base: str, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "temperature": 0}
    while time.monotonic() < deadline:
        try:
            if httpx.post(base + "/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base} not ready")


def _run_receiver(port: int, stop: Any) -> None:
    from tests._support.otlp_receiver import OtlpHttpReceiver

    with OtlpHttpReceiver(port=port):
        stop.wait()


@contextlib.contextmanager
def _receiver_process() -> Iterator[str]:
    """An OTLP/HTTP receiver in its own process: decoding spans must not slow the clients
    (which run in this process) during the observed rounds only."""
    import multiprocessing

    from tests._support.ray_env import free_port

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_run_receiver, args=(port, stop), daemon=True)
    proc.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        proc.join(10)


def serve_bench(variants: list[str], concurrency: int, seconds: float, rounds: int,
                max_tokens: int) -> dict[str, Any]:
    """The plain server stays deployed; each observed variant is deployed beside it in turn
    (two engines at most) and the two are loaded in alternating rounds (ABBA order), so the
    drift of a shared machine hits both alike. The ratio is the median of per-pair ratios."""
    from ray import serve

    from tests._support.ray_env import free_port, start_local_ray
    from tests._support.tiny_model import make_tiny_model

    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    results: dict[str, Any] = {"concurrency": concurrency, "seconds": seconds, "rounds": rounds,
                               "max_tokens": max_tokens, "variants": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, _receiver_process() as endpoint:
        model_dir = make_tiny_model(Path(tmp) / "model")
        # Logical CPUs: two apps need about 3 each (ingress, replica, engine bundle).
        run = start_local_ray(Path(tmp) / "ray", num_cpus=8, env=env)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            root = f"http://127.0.0.1:{port}"
            _deploy(PLAIN, "plain", model_dir, endpoint, env)
            _wait_ready(root + "/plain")
            for variant in variants:
                started = time.perf_counter()
                _deploy(variant, "observed", model_dir, endpoint, env)
                _wait_ready(root + "/observed")
                ready_s = time.perf_counter() - started
                bases = {"plain": root + "/plain", "observed": root + "/observed"}
                for base in bases.values():  # warm-up
                    asyncio.run(_load(base, concurrency, 5, max_tokens))
                rps: dict[str, list[float]] = {"plain": [], "observed": []}
                errors = 0
                for i in range(rounds):
                    order = ("plain", "observed") if i % 2 == 0 else ("observed", "plain")
                    for which in order:
                        done, failed = asyncio.run(
                            _load(bases[which], concurrency, seconds, max_tokens)
                        )
                        rps[which].append(done / seconds)
                        errors += failed
                ratios = [o / p for o, p in zip(rps["observed"], rps["plain"], strict=True)]
                entry = {
                    "name": variant, "ready_s": ready_s, "errors": errors,
                    "plain_rps": rps["plain"], "observed_rps": rps["observed"],
                    "median_plain_rps": statistics.median(rps["plain"]),
                    "median_observed_rps": statistics.median(rps["observed"]),
                    "ratio": statistics.median(ratios), "pair_ratios": ratios,
                }
                results["variants"].append(entry)
                print(f"{variant}: {entry['median_observed_rps']:.2f} req/s vs plain "
                      f"{entry['median_plain_rps']:.2f} req/s, ratio {entry['ratio']:.3f} "
                      f"(pairs {[round(r, 3) for r in ratios]}, errors {errors})", flush=True)
                serve.delete("observed")
                time.sleep(5)  # let its engine process exit before the next one starts
        finally:
            serve.shutdown()
            run.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", default="all", choices=["micro", "serve", "all"])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if args.part in ("micro", "all"):
        result["micro"] = micro(args.chunks, args.requests, args.repeat)
        m = result["micro"]
        print(f"bare engine generator: {m['bare_us_per_chunk']:.3f} us/chunk")
        for name, case in m["cases"].items():
            print(f"{name}: +{case['us_per_chunk']:.3f} us/chunk, "
                  f"+{case['us_per_request']:.1f} us/request")
    if args.part in ("serve", "all"):
        variants = [v for v in VARIANTS if v != PLAIN]
        result["serve"] = serve_bench(variants, args.concurrency, args.seconds, args.rounds,
                                      args.max_tokens)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
