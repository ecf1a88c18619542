"""What ObservedLLMServer costs per request and per streamed chunk, in one run.

Two parts:

1. ``micro`` (no Ray, seconds): the request observer around an engine generator that yields
   realistic vLLM chunks with no work in between, against iterating that generator bare. The
   difference is the observer's own cost: microseconds per streamed chunk and per request, with
   the GenAI span (real SDK tracer, batch processor, discarding exporter) and metrics
   (prometheus_client) on. Cases: a Composite whose children implement no request hook, one with
   TokenCounter (``on_llm_end`` only), one with StreamingProgress (``on_llm_stream_chunk``: the
   chunks get parsed, shown for contrast).
2. ``serve`` (minutes): throughput on the real CPU vLLM engine behind Ray Serve, "with the same
   engine" literally: one replica, one engine, three request paths. The replica's server class
   is ``benchmarks/same_engine_server.py``'s ``SameEngineServer`` (an ``ObservedLLMServer``) which
   answers each chat request along the path its OpenAI ``user`` field names: ``plain`` (Ray's
   ``LLMServer.chat`` with the unwrapped engine), ``observed`` (the observed path, a Composite
   with no request hooks) or ``tokencounter`` (the observed path with TokenCounter). Requests go
   over HTTP: Serve proxy, Ray's OpenAI ingress, the replica. ``--concurrency`` closed-loop
   clients send half streamed, half non-streamed chat requests of ``--max-tokens`` tokens
   (greedy, ignore_eos), all on one path for a block of ``--seconds`` (then drained: a block's
   time runs to its last answer); a cycle is one block per path, in an order that rotates
   through all permutations. Each path's throughput is its requests over its blocks' time; the
   ratio to ``plain`` has a 95 % bootstrap CI over cycles (pairing kept) and a paired-t CI on the
   per-cycle log ratios. Between blocks the CPU time of every process is read (psutil), giving
   CPU per request by process group and a second, far less noisy throughput ratio: the one
   implied by the path's extra CPU outside the engine (``replica_cost_ratio``). Spans go to an
   OTLP/HTTP receiver in a process of its own; the run checks that every observed-path request
   made one span and TokenCounter counted its path's requests. ``pool`` reads several ``--out``
   files of ``serve`` and compares all their cycles.

``micro --busy 2`` runs the micro part beside two processes that keep the cores busy with
matmuls, as the serve benchmark's CPU engine does: the same code then costs more CPU per
request (caches and cores shared), which is part of why the replica figures are larger.

Run: ``python benchmarks/request_overhead.py [micro|serve|all] [--busy N] [--out result.json]``, or
``python benchmarks/request_overhead.py pool a.json b.json``.
Goals: serve throughput ratio >= 0.98 with no request hooks; <= 1 us per streamed chunk when no
child implements ``on_llm_stream_chunk``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
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


def fake_engine(chunks: int, completion_tokens: int | None = None) -> _Engine:
    """An :class:`_Engine` of ``chunks`` chunks whose non-streamed answer is a real
    ``ChatCompletionResponse`` (usage: 9 prompt tokens, ``completion_tokens`` or ``chunks``)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionResponse

    out = completion_tokens if completion_tokens is not None else chunks
    engine = _Engine(chunks)
    engine.response = ChatCompletionResponse.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": out, "total_tokens": 9 + out},
    })
    return engine


def mixed_requests(requests: int, chunks: int) -> list[Any]:
    """``requests`` chat requests for ``chunks`` tokens each, every other one streamed."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

    return [ChatCompletionRequest(model=MODEL, stream=i % 2 == 0, max_tokens=chunks,
                                  messages=[{"role": "user", "content": "hi"}])
            for i in range(requests)]


def _observer(children: list[Any], engine: Any) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from llm_otel_callbacks import Composite
    from llm_otel_callbacks.serve.server import request_observer
    from llm_otel_callbacks.telemetry import Telemetry, TelemetrySettings

    class Discard(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tel = Telemetry(TelemetrySettings.resolve({"metrics_backend": "prometheus"}, environ={}))
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=1 << 16))
    tel.tracer = provider.get_tracer("bench")
    # The observer ObservedLLMServer builds, on a tracer whose spans go nowhere.
    return request_observer(Composite(callbacks=children), MODEL, engine, tel=tel)


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
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

    cases = {
        "no request hooks": [{"callback_class": "llm_otel_callbacks.builtin.Timing"}],
        "TokenCounter": ["llm_otel_callbacks.builtin.Timing",
                         "llm_otel_callbacks.builtin.TokenCounter"],
        "StreamingProgress (chunk hook)": ["llm_otel_callbacks.builtin.StreamingProgress"],
    }
    engine = fake_engine(chunks, completion_tokens=16)

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
        observer = _observer(children, engine)

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


def micro_export(requests: int, repeat: int, chunks: int = 16) -> dict[str, Any]:
    """Process CPU per request of the observer as deployed by default: our own provider and
    lean OTLP/HTTP span export to a live receiver (its own process) on the default schedule,
    the GenAI histograms in one backend (prometheus_client here; Ray's metrics in a replica),
    TokenCounter, half the requests streamed (``chunks`` chunks). Each repeat times the bare
    engine generator and the observed one alternately, on ``time.process_time`` (all threads:
    the export thread's encoding and POSTs count), the observed side including its flush."""

    from llm_otel_callbacks import Composite
    from llm_otel_callbacks.serve.server import request_observer
    from llm_otel_callbacks.telemetry import Telemetry, TelemetrySettings

    engine = fake_engine(chunks)
    receiver = _Receiver()
    try:
        time.sleep(2)
        tel = Telemetry(TelemetrySettings.resolve(
            {"endpoint": receiver.endpoint, "metrics_backend": "prometheus"}, environ={}))
        observer = request_observer(
            Composite(callbacks=["llm_otel_callbacks.builtin.Timing",
                                 "llm_otel_callbacks.builtin.TokenCounter"]),
            MODEL, engine, tel=tel)

        def batch() -> list[Any]:
            return mixed_requests(requests, chunks)

        async def bare(reqs: list[Any]) -> None:
            for r in reqs:
                await _drain(engine.chat(r))

        async def observed(reqs: list[Any]) -> None:
            for r in reqs:
                await _drain(observer.observe("chat", engine.chat, r, None))

        def cpu(run: Any, flush: Any) -> float:
            reqs = batch()
            gc.collect()
            c0 = time.process_time()
            asyncio.run(run(reqs))
            flush()
            return time.process_time() - c0

        asyncio.run(observed(batch()[:4]))  # build telemetry and metric children
        bare_s, obs_s = [], []
        for _ in range(repeat):
            bare_s.append(cpu(bare, lambda: None))
            obs_s.append(cpu(observed, lambda: tel.force_flush(30)))
        tel.shutdown()
    finally:
        received = receiver.stop()
    diffs = sorted((o - b) / requests * 1e6 for o, b in zip(obs_s, bare_s, strict=True))
    return {"requests": requests, "repeat": repeat, "chunks_per_stream": chunks,
            "bare_us_per_request": min(bare_s) / requests * 1e6,
            "observed_us_per_request": min(obs_s) / requests * 1e6,
            "extra_us_per_request": (min(obs_s) - min(bare_s)) / requests * 1e6,
            "extra_us_per_request_by_repeat": diffs, "spans_received": received}


# --- part 2: serve ------------------------------------------------------------------------------

SERVER_CLS = "benchmarks.same_engine_server.SameEngineServer"
REFERENCE = "plain"
COMPARED = {"observed": "ObservedLLMServer, no request hooks",
            "tokencounter": "ObservedLLMServer, TokenCounter"}
GOAL = 0.98
#: Extra replica CPU per request over stock LLMServer (issue 13): full GenAI telemetry plus
#: TokenCounter, default export schedules.
REPLICA_GOAL_US = 150


def _body(path: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    # ``user`` names the server path (see same_engine_server.py); vLLM ignores it otherwise.
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello model"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            "user": path}


async def _request(client: Any, url: str, body: dict[str, Any]) -> bool:
    """One request; True when it completed with a whole, error-free answer."""
    import httpx

    try:
        if body["stream"]:
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    return False
                done = False
                async for line in resp.aiter_lines():
                    if line.startswith('data: {"error"'):
                        return False
                    done = done or line == "data: [DONE]"
                return done
        resp = await client.post(url, json=body)
        return resp.status_code == 200 and bool(resp.json().get("choices"))
    except (httpx.HTTPError, ValueError):
        return False


async def _block(client: Any, url: str, path: str, concurrency: int, seconds: float,
                 max_tokens: int) -> dict[str, Any]:
    """``concurrency`` closed-loop clients on one path for ``seconds``, then drained: the
    block's time runs from its start to its last answer."""
    start = time.perf_counter()
    deadline = start + seconds
    done = errors = 0

    async def worker(index: int) -> None:
        nonlocal done, errors
        turn = index
        while time.perf_counter() < deadline:
            turn += 1  # half streamed, half not, at every moment
            if await _request(client, url, _body(path, turn % 2 == 0, max_tokens)):
                done += 1
            else:
                errors += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"path": path, "done": done, "errors": errors,
            "seconds": time.perf_counter() - start}


#: Processes that serve a request, by what their command line starts with (psutil names).
CPU_GROUPS = {
    "replica": ("ray::ServeReplica:bench:SameEngineServer",),
    "engine": ("VLLM::EngineCore", "VLLM::Worker"),
    "ingress": ("ray::ServeReplica:bench:OpenAiIngress",),
    "proxy": ("ray::ProxyActor",),
}
SERVING = tuple(CPU_GROUPS)


class CpuMeter:
    """CPU seconds (user + system) of this process's descendants (Ray, Serve, vLLM), by group:
    the request-path processes of ``CPU_GROUPS``, ``client`` (this process: the load), and
    ``other`` (Ray's own daemons). External load on a shared machine changes the wall time of a
    block much more than the CPU our processes spend per request."""

    def __init__(self, exclude: Sequence[int] = ()) -> None:
        import psutil

        self._me = psutil.Process()
        self._exclude = set(exclude)
        self._groups: dict[int, str] = {}

    def _group(self, proc: Any) -> str:
        try:
            line = " ".join(proc.cmdline()) or proc.name()
        except Exception:
            return "other"
        for group, prefixes in CPU_GROUPS.items():
            if line.startswith(prefixes):
                return group
        return "other"

    def sample(self) -> dict[int, tuple[str, float]]:
        """CPU seconds so far of every live descendant, by pid."""
        out: dict[int, tuple[str, float]] = {}
        procs = [self._me, *self._me.children(recursive=True)]
        for proc in procs:
            if proc.pid in self._exclude:
                continue
            group = self._groups.get(proc.pid)
            if group is None:  # a pid is not reused within one run
                group = "client" if proc.pid == self._me.pid else self._group(proc)
                self._groups[proc.pid] = group
            try:
                t = proc.cpu_times()
            except Exception:
                continue
            out[proc.pid] = (group, t.user + t.system)
        return out

    @staticmethod
    def delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
              ) -> dict[str, float]:
        """CPU seconds spent between two samples, by group (processes alive at both)."""
        spent: dict[str, float] = {}
        for pid, (group, end) in after.items():
            if pid in before:
                spent[group] = spent.get(group, 0.0) + end - before[pid][1]
        return spent


async def _measure(url: str, paths: Sequence[str], concurrency: int, seconds: float,
                   cycles: int, warmup: int, max_tokens: int, meter: CpuMeter
                   ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Cycles of one block per path; the order rotates through all permutations, so each
    path runs first, middle and last equally often. Returns (cycles, warm-up blocks)."""
    import itertools

    import httpx

    orders = list(itertools.permutations(paths))
    out: list[list[dict[str, Any]]] = []
    warm: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=2 * concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for _ in range(warmup):  # the first blocks after start run slow: not counted
            for path in paths:
                warm.append(await _block(client, url, path, concurrency, seconds, max_tokens))
        started = time.perf_counter()
        for c in range(cycles):
            cycle = []
            for path in orders[c % len(orders)]:
                before = meter.sample()  # between blocks: outside every block's time
                block = await _block(client, url, path, concurrency, seconds, max_tokens)
                block["cpu"] = meter.delta(before, meter.sample())
                cycle.append(block)
            cycle[0]["load1"] = os.getloadavg()[0]
            out.append(cycle)
            if (c + 1) % 10 == 0:
                print(f"  {c + 1}/{cycles} cycles, {time.perf_counter() - started:.0f} s",
                      flush=True)
    return out, warm


def _t975(df: int) -> float:
    """Student's t 97.5 % quantile (Cornish-Fisher expansion; within 0.1 % for df >= 10)."""
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _wall(block: dict[str, Any]) -> float:
    return float(block["seconds"])


def _serving_cpu(block: dict[str, Any]) -> float:
    return sum(block["cpu"].get(group, 0.0) for group in SERVING)


def _bootstrap(n: int, stat: Any, resamples: int, seed: int) -> list[float]:
    """``stat`` over ``resamples`` resamples of whole cycles (the pairing is kept), sorted."""
    import random

    rng = random.Random(seed)
    return sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))


def compare(cycles: list[list[dict[str, Any]]], path: str, ref: str = REFERENCE,
            cost: Any = _wall, resamples: int = 10_000, seed: int = 6) -> dict[str, Any]:
    """Throughput of ``path`` over ``ref``, both measured in every cycle: requests per second
    of ``cost`` (wall time of the blocks by default; or serving CPU seconds).

    ``ratio``: pooled (all requests of ``path`` per cost of ``path`` blocks, over the same for
    ``ref``), with a percentile bootstrap 95 % CI that resamples whole cycles. ``paired``:
    geometric mean of the per-cycle ratios with a paired-t 95 % CI on their logarithms."""
    import math

    def of(which: str) -> list[tuple[int, float]]:
        return [next((b["done"], cost(b)) for b in cycle if b["path"] == which)
                for cycle in cycles]

    x, r = of(path), of(ref)
    n = len(cycles)

    def pooled(idx: Sequence[int]) -> float:
        xd = sum(x[i][0] for i in idx)
        xt = sum(x[i][1] for i in idx)
        rd = sum(r[i][0] for i in idx)
        rt = sum(r[i][1] for i in idx)
        return (xd / xt) / (rd / rt)

    boot = _bootstrap(n, pooled, resamples, seed)
    per_cycle = [(xd / xt) / (rd / rt) for (xd, xt), (rd, rt) in zip(x, r, strict=True)]
    logs = [math.log(v) for v in per_cycle]
    mean = statistics.fmean(logs)
    half = _t975(n - 1) * statistics.stdev(logs) / math.sqrt(n)
    low, high = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    verdict = ("meets" if low >= GOAL else "misses" if high < GOAL else "unresolved")
    return {
        "ratio": pooled(range(n)), "ci95": [low, high],
        "paired_geomean": math.exp(mean), "paired_ci95": [math.exp(mean - half),
                                                          math.exp(mean + half)],
        "cycle_ratio_median": statistics.median(per_cycle),
        "cycle_ratio_range": [min(per_cycle), max(per_cycle)],
        "cycle_log_ratio_sd": statistics.stdev(logs),
        "rate": sum(d for d, _ in x) / sum(t for _, t in x),
        "reference_rate": sum(d for d, _ in r) / sum(t for _, t in r),
        "requests": sum(d for d, _ in x), "reference_requests": sum(d for d, _ in r),
        "goal": GOAL, "verdict": verdict,
    }


def cpu_per_request(cycles: list[list[dict[str, Any]]], path: str, group: str,
                    ref: str = REFERENCE, resamples: int = 10_000, seed: int = 7
                    ) -> dict[str, Any]:
    """CPU microseconds per request of one process group on ``path`` and on ``ref``, and the
    difference with a bootstrap 95 % CI over cycles."""

    def of(which: str) -> list[tuple[int, float]]:
        return [next((b["done"], b["cpu"].get(group, 0.0)) for b in c if b["path"] == which)
                for c in cycles]

    x, r = of(path), of(ref)

    def diff(idx: Sequence[int]) -> float:
        return 1e6 * (sum(x[i][1] for i in idx) / sum(x[i][0] for i in idx)
                      - sum(r[i][1] for i in idx) / sum(r[i][0] for i in idx))

    boot = _bootstrap(len(cycles), diff, resamples, seed)
    everything = range(len(cycles))
    return {
        "us_per_request": 1e6 * sum(c for _, c in x) / sum(d for d, _ in x),
        "reference_us_per_request": 1e6 * sum(c for _, c in r) / sum(d for d, _ in r),
        "difference_us": diff(everything),
        "difference_ci95": [boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]],
    }


def _run_receiver(port: int, stop: Any, counts: Any) -> None:
    from llm_otel_callbacks.demo.otlp_receiver import OtlpHttpReceiver

    with OtlpHttpReceiver(port=port) as receiver:
        stop.wait()
        by_name: dict[str, int] = {}
        for span in receiver.spans():
            by_name[span.name] = by_name.get(span.name, 0) + 1
        counts.put(by_name)


class _Receiver:
    """An OTLP/HTTP receiver in its own process: decoding spans must not slow the clients
    (which run in this process) while the observed paths are loaded only."""

    def __init__(self) -> None:
        import multiprocessing

        from llm_otel_callbacks.demo.ports import free_port

        self.port = free_port()
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._counts = ctx.Queue()
        self._proc = ctx.Process(target=_run_receiver, args=(self.port, self._stop,
                                                             self._counts), daemon=True)
        self._proc.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self._proc.pid or 0)

    def stop(self) -> dict[str, int]:
        """Stop; returns the spans received, by name."""
        self._stop.set()
        try:
            counts: dict[str, int] = self._counts.get(timeout=30)
        except Exception:
            counts = {}
        self._proc.join(10)
        return counts


@contextlib.contextmanager
def same_engine_app(
    folder: Path, endpoint: str, env: dict[str, str]
) -> Iterator[tuple[str, float]]:
    """A local Ray with Serve on 127.0.0.1 and the same-engine app deployed and answering a
    chat request; yields (base URL, seconds from deploy to ready). Everything is torn down on
    exit. The demo's toolkit does it all; the replica imports ``benchmarks.*`` from the repo."""
    from llm_otel_callbacks.demo.local_ray import pythonpath
    from llm_otel_callbacks.demo.serve_app import deployed
    from llm_otel_callbacks.demo.tiny_model import make_tiny_model

    model_dir = make_tiny_model(folder / "model")
    callback_config = {
        "callback_class": "llm_otel_callbacks.Composite",
        "callback_kwargs": {"callbacks": ["llm_otel_callbacks.builtin.Timing"],
                            "telemetry": {"endpoint": endpoint}},
    }
    with deployed(folder, model_dir, callback_config, env={**env, "PYTHONPATH": pythonpath(REPO)},
                  app_name="bench", chat_ready=True, ready_timeout_s=900, model_id=MODEL,
                  server_cls=SERVER_CLS) as app:
        yield app.base_url, app.ready_s


def replica_handle() -> Any:
    """A deployment handle to the same-engine server (the app's one non-ingress deployment)."""
    from ray import serve

    status = serve.status().applications["bench"]
    name = next(d for d in status.deployments if "Ingress" not in d)
    return serve.get_deployment_handle(name, app_name="bench")


def _token_totals() -> dict[str, Any]:
    """TokenCounter's totals in the replica, through a deployment handle."""
    totals: dict[str, Any] = replica_handle().token_totals.remote().result(timeout_s=60)
    return totals


def serve_bench(concurrency: int, seconds: float, cycles: int, warmup: int,
                max_tokens: int, engine_threads: int | None = None,
                checkpoint: Path | None = None,
                engine_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One replica, one engine, three request paths (see same_engine_server.py), loaded over
    HTTP (Serve proxy, Ray's OpenAI ingress, the replica) in interleaved blocks."""
    from llm_otel_callbacks.demo.serve_app import CPU_ENGINE_ENV

    env = dict(CPU_ENGINE_ENV)
    if engine_threads:
        env["OMP_NUM_THREADS"] = str(engine_threads)
    env.update(engine_env or {})
    paths = [REFERENCE, *COMPARED]
    result: dict[str, Any] = {
        "concurrency": concurrency, "block_seconds": seconds, "cycles": cycles,
        "engine_threads": engine_threads, "engine_env": engine_env, "warmup_cycles": warmup,
        "max_tokens": max_tokens,
        "paths": paths,
        "route": "HTTP: Serve proxy -> OpenAiIngress -> SameEngineServer (one replica)",
    }
    receiver = _Receiver()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp, \
                same_engine_app(Path(tmp), receiver.endpoint, env) as (root, ready_s):
            result["ready_s"] = ready_s
            print(f"ready after {ready_s:.0f} s", flush=True)
            measured = time.perf_counter()
            meter = CpuMeter(exclude=[receiver.pid])
            blocks, warm = asyncio.run(_measure(root + "/v1/chat/completions", paths,
                                          concurrency, seconds, cycles, warmup,
                                          max_tokens, meter))
            result["measure_s"] = time.perf_counter() - measured
            if checkpoint is not None:  # the blocks survive a failing shutdown
                checkpoint.write_text(json.dumps({"serve": {**result, "blocks": blocks,
                                                            "warmup_blocks": warm}}))
            result["token_totals"] = _token_totals()
            time.sleep(3)  # the batch span processor exports every second
    finally:
        result["spans_received"] = receiver.stop()
    result["blocks"] = blocks
    result["warmup_blocks"] = warm
    everything = [b for c in blocks for b in c] + warm
    result["errors"] = sum(b["errors"] for b in everything)
    # Every request of the observed paths makes one span; TokenCounter counts its own.
    served = {p: sum(b["done"] + b["errors"] for b in everything if b["path"] == p)
              for p in paths}
    result["path_check"] = {
        "observed_path_requests": served["observed"] + served["tokencounter"],
        "request_spans": result["spans_received"].get(f"chat {MODEL}", 0),
        "tokencounter_requests": served["tokencounter"],
        "tokencounter_count": result["token_totals"].get("request_count"),
    }
    _report(result)
    return result


#: Where the observed path can add CPU: the replica process (hooks, span, GenAI metrics, the
#: span export thread, the vLLM frontend's extra usage chunk), and Ray's daemons (``other``:
#: the metrics agent receives the replica's GenAI metrics), plus the ingress and proxy
#: (unchanged work; counted so that nothing is assumed away). Left out: the engine processes,
#: whose work is the same tokens on every path and whose CPU (OpenMP threads that spin more or
#: less with the machine's load) is the noisiest figure; and the client.
COST_GROUPS = ("replica", "ingress", "proxy", "other")


def replica_cost_ratio(cycles: list[list[dict[str, Any]]], path: str, ref: str = REFERENCE,
                       resamples: int = 10_000, seed: int = 8) -> dict[str, Any]:
    """Throughput ratio implied by the path's extra CPU outside the engine: S / (S + D), with
    S = plain's CPU per request of all our processes but the client (serving and Ray's
    daemons), D = the path's CPU per request in ``COST_GROUPS`` minus plain's. On a machine
    saturated by serving, throughput is CPU over CPU per request, so this is the throughput
    ratio; D is measured far more precisely than wall time, which others' load moves by
    +-15 % from block to block."""

    def cpu(block: dict[str, Any], groups: Sequence[str]) -> float:
        return sum(block["cpu"].get(g, 0.0) for g in groups)

    def of(which: str) -> list[tuple[int, float, float]]:
        return [next((b["done"], cpu(b, COST_GROUPS), cpu(b, (*SERVING, "other")))
                     for b in c if b["path"] == which) for c in cycles]

    x, r = of(path), of(ref)

    def ratio(idx: Sequence[int]) -> float:
        rd = sum(r[i][0] for i in idx)
        serving = sum(r[i][2] for i in idx) / rd
        extra = sum(x[i][1] for i in idx) / sum(x[i][0] for i in idx) - sum(
            r[i][1] for i in idx) / rd
        return serving / (serving + extra)

    boot = _bootstrap(len(cycles), ratio, resamples, seed)
    low, high = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    return {"ratio": ratio(range(len(cycles))), "ci95": [low, high], "goal": GOAL,
            "groups": list(COST_GROUPS),
            "verdict": "meets" if low >= GOAL else "misses" if high < GOAL else "unresolved"}


def _report(result: dict[str, Any]) -> None:
    blocks = result["blocks"]
    result["requests_per_block"] = statistics.median(b["done"] for c in blocks for b in c)
    result["load1"] = [min(c[0]["load1"] for c in blocks), max(c[0]["load1"] for c in blocks)]
    with_cpu = all("cpu" in b for c in blocks for b in c)
    result["comparisons"] = {}
    for path, name in COMPARED.items():
        entry: dict[str, Any] = {"wall": compare(blocks, path)}
        if with_cpu:
            entry["serving_cpu"] = compare(blocks, path, cost=_serving_cpu)
            entry["replica_cost"] = replica_cost_ratio(blocks, path)
            entry["cpu_us_per_request"] = {
                group: cpu_per_request(blocks, path, group)
                for group in (*SERVING, "client", "other")
            }
        result["comparisons"][name] = entry
        for kind, cmp in entry.items():
            if kind == "cpu_us_per_request":
                continue
            if kind == "replica_cost":
                rep = entry["cpu_us_per_request"]["replica"]
                print(f"{name} [CPU outside the engine]: ratio {cmp['ratio']:.4f} (95 % CI "
                      f"{cmp['ci95'][0]:.4f}-{cmp['ci95'][1]:.4f}): {cmp['verdict']} >= {GOAL}; "
                      f"extra replica CPU {rep['difference_us']:+.0f} us per request (95 % CI "
                      f"{rep['difference_ci95'][0]:+.0f} to {rep['difference_ci95'][1]:+.0f}) "
                      f"over {rep['reference_us_per_request']:.0f} us: goal <= "
                      f"{REPLICA_GOAL_US} us", flush=True)
                continue
            unit = "req/s" if kind == "wall" else "req per serving CPU-s"
            print(f"{name} [{kind}]: {cmp['rate']:.2f} vs plain {cmp['reference_rate']:.2f} "
                  f"{unit}, ratio {cmp['ratio']:.4f} (95 % CI {cmp['ci95'][0]:.4f}-"
                  f"{cmp['ci95'][1]:.4f}; paired {cmp['paired_geomean']:.4f}, "
                  f"{cmp['paired_ci95'][0]:.4f}-{cmp['paired_ci95'][1]:.4f}; cycle sd "
                  f"{cmp['cycle_log_ratio_sd']:.3f}) over {len(blocks)} cycles: "
                  f"{cmp['verdict']} >= {GOAL}", flush=True)
        for group, per in entry.get("cpu_us_per_request", {}).items():
            print(f"    {group}: {per['us_per_request']:.0f} vs "
                  f"{per['reference_us_per_request']:.0f} us CPU/request, difference "
                  f"{per['difference_us']:+.0f} us (95 % CI "
                  f"{per['difference_ci95'][0]:+.0f} to {per['difference_ci95'][1]:+.0f})",
                  flush=True)
    print(f"requests per block (median) {result['requests_per_block']}, errors "
          f"{result.get('errors')}, load1 {result['load1']}, path check "
          f"{result.get('path_check')}", flush=True)


def pool(files: Sequence[Path]) -> dict[str, Any]:
    """The cycles of several ``serve`` results, compared as one sample (cycles are
    independent; each run's blocks were interleaved the same way)."""
    runs = [json.loads(f.read_text())["serve"] for f in files]
    result: dict[str, Any] = {"files": [str(f) for f in files],
                              "blocks": [c for run in runs for c in run["blocks"]],
                              "errors": sum(b["errors"] for run in runs
                                            for c in run["blocks"] for b in c)}
    _report(result)
    return result


def _spin(stop: Any) -> None:
    """Keep one core busy the way a CPU engine's worker does (dense matmuls)."""
    import numpy as np

    a = np.random.rand(256, 256)
    while not stop.is_set():
        a = a @ a
        a /= np.abs(a).max() or 1.0


@contextlib.contextmanager
def _busy(processes: int) -> Iterator[None]:
    """``processes`` processes spinning matmuls (``--busy``): the micro figures under the CPU
    contention a replica sees when the engine shares its cores (the serve benchmark's tiny
    CPU engine does)."""
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(processes)]
    for proc in procs:
        proc.start()
    try:
        time.sleep(1.0 if procs else 0.0)
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", default="all",
                        choices=["micro", "serve", "all", "pool"])
    parser.add_argument("results", nargs="*", type=Path, help="pool: serve results (--out)")
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="one block's load")
    parser.add_argument("--cycles", type=int, default=40, help="blocks per path")
    parser.add_argument("--warmup", type=int, default=3, help="cycles not counted")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--engine-threads", type=int, help="OMP_NUM_THREADS of the engine")
    parser.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra env of the replica and engine (e.g. OMP_WAIT_POLICY=PASSIVE)")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="micro: run beside N processes spinning matmuls (CPU contention)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if args.part in ("micro", "all"):
        with _busy(args.busy):
            result["micro"] = micro(args.chunks, args.requests, args.repeat)
            result["micro_export"] = micro_export(min(args.requests, 2_000), args.repeat)
        result["busy_processes"] = args.busy
        m = result["micro"]
        print(f"bare engine generator: {m['bare_us_per_chunk']:.3f} us/chunk")
        for name, case in m["cases"].items():
            print(f"{name}: +{case['us_per_chunk']:.3f} us/chunk, "
                  f"+{case['us_per_request']:.1f} us/request")
        e = result["micro_export"]
        print(f"TokenCounter, default export (OTLP/HTTP to a receiver), half streamed: "
              f"+{e['extra_us_per_request']:.1f} us process CPU per request (best of "
              f"{e['repeat']}: {e['observed_us_per_request']:.1f} vs bare "
              f"{e['bare_us_per_request']:.1f}; per repeat "
              f"{', '.join(f'{d:+.0f}' for d in e['extra_us_per_request_by_repeat'])}); spans "
              f"received {e['spans_received']}", flush=True)
    if args.part in ("serve", "all"):
        result["serve"] = serve_bench(args.concurrency, args.seconds, args.cycles, args.warmup,
                                      args.max_tokens, args.engine_threads, args.out,
                                      dict(kv.split("=", 1) for kv in args.engine_env))
    if args.part == "pool":
        result["pool"] = pool(args.results)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
