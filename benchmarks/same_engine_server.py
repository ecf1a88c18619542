"""Benchmark-only server class: one replica, one engine, the plain and the observed request paths.

``request_overhead.py serve`` deploys this as the ``server_cls`` (the replica imports it through
``PYTHONPATH`` = the repo root, as the tests' replicas import ``tests.*``). It starts exactly as
``ObservedLLMServer`` does (one vLLM engine, the replica's Composite) and then answers each chat
request along the path named in the request's OpenAI ``user`` field:

* ``plain``: Ray's ``LLMServer.chat`` on a plain Ray ``LLMServer`` instance whose engine is the
  real, unwrapped engine: exactly what Ray's default server runs per request;
* ``observed``: ``ObservedLLMServer``'s own path (``self``, engine wrapped by the observer built
  from the replica's callback: a Composite whose children implement no request hook);
* ``tokencounter``: the same path with an observer built from a second Composite (the replica's
  telemetry settings, children ``Timing`` and ``TokenCounter``), as ``ObservedLLMServer`` builds it.

With ``BENCH_STEP_CPU=1`` in the replica's environment, each path's engine (the plain one, the
observed one) is wrapped in one more, identical layer that adds up the thread CPU time of every
synchronous step of the engine call and of its generator (each ``send`` into the coroutine that
advances it: from one suspension to the next, so other tasks' time in between is not counted).
``step_cpu()`` returns the totals per path: the request path's own CPU on the replica's event
loop (the observer, vLLM's OpenAI serving layer, the engine client), without the work outside
it (Ray Serve's request handling, vLLM's output loop, other threads).

``ObservedLLMServer`` changes nothing per request except the engine object that
``LLMServer._run_request`` calls, so the three paths differ only in that object. The path
choice (one attribute read, one comparison) is the same for all three. Only ``chat`` is routed;
the load sends chat requests only.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncGenerator, Coroutine, Generator
from typing import Any

from llm_otel_callbacks import Composite
from llm_otel_callbacks.serve import ObservedLLMServer
from llm_otel_callbacks.serve.server import LLMServer, ObservedEngine, request_observer

PLAIN = "plain"
OBSERVED = "observed"
TOKENCOUNTER = "tokencounter"
PATHS = (PLAIN, OBSERVED, TOKENCOUNTER)

TOKENCOUNTER_CHILDREN = ["llm_otel_callbacks.builtin.Timing",
                         "llm_otel_callbacks.builtin.TokenCounter"]


class _StepCpu:
    """Requests and thread CPU nanoseconds of one path's engine calls."""

    def __init__(self) -> None:
        self.requests = 0
        self.cpu_ns = 0


class _GcClock:
    """Collections and their thread CPU nanoseconds, per generation, in this process (all
    threads): a path that allocates more triggers more, and in a replica's heap (torch, vLLM,
    Ray: hundreds of thousands of objects) a full collection is expensive."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.cpu_ns = [0, 0, 0]
        self._start = 0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.thread_time_ns()
            return
        generation = info["generation"]
        self.count[generation] += 1
        self.cpu_ns[generation] += time.thread_time_ns() - self._start


class _Timed:
    """Awaits ``coro``, adding the thread CPU of each of its steps (one ``send`` or ``throw``,
    which runs until the coroutine suspends or ends) to ``meter``."""

    def __init__(self, coro: Coroutine[Any, Any, Any], meter: _StepCpu) -> None:
        self.coro = coro
        self.meter = meter

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, meter, clock = self.coro, self.meter, time.thread_time_ns
        value: Any = None
        error: BaseException | None = None
        while True:
            start = clock()
            try:
                pending = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                meter.cpu_ns += clock() - start
                return stop.value
            except BaseException:
                meter.cpu_ns += clock() - start
                raise
            meter.cpu_ns += clock() - start
            try:
                value, error = (yield pending), None
            except BaseException as exc:  # thrown in (cancellation): hand it to the coroutine
                value, error = None, exc


async def _metered(gen: AsyncGenerator[Any, None], meter: _StepCpu) -> AsyncGenerator[Any, None]:
    try:
        while True:
            try:
                item = await _Timed(gen.__anext__(), meter)
            except StopAsyncIteration:
                return
            yield item
    finally:
        await _Timed(gen.aclose(), meter)


class _MeteredEngine:
    """An engine whose ``chat`` calls and generators are metered (see the module docstring)."""

    def __init__(self, engine: Any, meter: _StepCpu) -> None:
        self._engine = engine
        self.meter = meter

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_engine"], name)

    def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        meter = self.meter
        start = time.thread_time_ns()
        gen = self._engine.chat(request, raw_request_info)
        meter.cpu_ns += time.thread_time_ns() - start
        meter.requests += 1
        return _metered(gen, meter)


class SameEngineServer(ObservedLLMServer):
    """``ObservedLLMServer`` that can also answer through Ray's plain path, per request."""

    async def start(self) -> None:
        await super().start()
        engine = self.engine
        if not isinstance(engine, ObservedEngine):
            raise RuntimeError("benchmark needs the observed engine (telemetry or hooks on)")
        raw = engine.wrapped
        plain: Any = LLMServer.sync_init(self._llm_config)  # Ray's class, Ray's methods
        plain.engine = raw
        kwargs = dict(self._llm_config.callback_config.callback_kwargs)
        kwargs["callbacks"] = list(TOKENCOUNTER_CHILDREN)
        counter = Composite(llm_config=self._llm_config, **kwargs)
        model = str(self._llm_config.model_id)
        observer = request_observer(counter, model, raw)
        if observer is None or not observer.hooks.end:
            raise RuntimeError("TokenCounter's on_llm_end was not resolved")
        tokens: Any = ObservedLLMServer.sync_init(self._llm_config)
        tokens.engine = ObservedEngine(raw, observer)
        self._plain = plain
        self._tokens = tokens
        self._counter = counter
        self._meters: dict[str, _StepCpu] = {}
        self._gc: _GcClock | None = None
        if os.environ.get("BENCH_STEP_CPU") == "1":
            self._gc = _GcClock()
            for path, server in ((PLAIN, plain), (OBSERVED, self), (TOKENCOUNTER, tokens)):
                meter = self._meters[path] = _StepCpu()
                server.engine = _MeteredEngine(server.engine, meter)

    async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        path = request.user
        if path == PLAIN:
            return await self._plain.chat(request, raw_request_info)
        if path == TOKENCOUNTER:
            return await self._tokens.chat(request, raw_request_info)
        return await super().chat(request, raw_request_info)

    async def step_cpu(self) -> dict[str, Any]:
        """Per path: (requests, thread CPU ns of their engine calls' steps) so far; under
        ``"gc"``: collections and their CPU ns per generation."""
        out: dict[str, Any] = {path: (m.requests, m.cpu_ns) for path, m in self._meters.items()}
        if self._gc is not None:
            out["gc"] = {"count": list(self._gc.count), "cpu_ns": list(self._gc.cpu_ns)}
        return out

    async def token_totals(self) -> dict[str, Any]:
        """TokenCounter's totals: proof that the tokencounter path ran its hook."""
        for child in self._counter.children:
            snapshot = getattr(child.instance, "snapshot", None)
            if snapshot is not None:
                return dict(snapshot())
        return {}
