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

A second, inner meter of the same kind sits right around the real engine on every path: inside
the observer on the observed paths, directly under the outer meter on the plain one. The
outer minus the inner total is then the observer's own CPU (plus one metering layer, which the
plain path's outer minus inner measures alone), taken from the very same requests, so it does
not move with how busy a block was. The inner meter also adds up the engine's steps after its
last content chunk (the usage chunk the observer asks for, ``[DONE]``, the generator's end):
what the engine does more for the observer. ``step_cpu()`` also reads the CPU of the threads
only the package runs (span export, metric pipe).

``ObservedLLMServer`` changes nothing per request except the engine object that
``LLMServer._run_request`` calls, so the three paths differ only in that object. The path
choice (one attribute read, one comparison) is the same for all three. Only ``chat`` is routed;
the load sends chat requests only.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import AsyncGenerator, Coroutine, Generator
from typing import Any

from llm_otel_callbacks import Composite
from llm_otel_callbacks.serve import ObservedLLMServer
from llm_otel_callbacks.serve.server import (
    LLMServer,
    ObservedEngine,
    _telemetry_of,
    request_observer,
)

PLAIN = "plain"
OBSERVED = "observed"
TOKENCOUNTER = "tokencounter"
PATHS = (PLAIN, OBSERVED, TOKENCOUNTER)

TOKENCOUNTER_CHILDREN = ["llm_otel_callbacks.builtin.Timing",
                         "llm_otel_callbacks.builtin.TokenCounter"]


class _StepCpu:
    """Requests and thread CPU nanoseconds of one path's engine calls; ``tail_ns``: the steps
    after the last content chunk (what yields a usage chunk or ``[DONE]``, the end, the close)."""

    def __init__(self) -> None:
        self.requests = 0
        self.cpu_ns = 0
        self.tail_ns = 0


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


def _is_tail(item: Any) -> bool:
    """A stream item after the content: the usage chunk (no choices) or ``[DONE]``."""
    return item.__class__ is str and (item.startswith("data: [") or '"choices":[]' in item)


async def _metered(gen: AsyncGenerator[Any, None], meter: _StepCpu) -> AsyncGenerator[Any, None]:
    try:
        while True:
            before = meter.cpu_ns
            try:
                item = await _Timed(gen.__anext__(), meter)
            except StopAsyncIteration:
                meter.tail_ns += meter.cpu_ns - before
                return
            if _is_tail(item):
                meter.tail_ns += meter.cpu_ns - before
            yield item
    finally:
        before = meter.cpu_ns
        await _Timed(gen.aclose(), meter)
        meter.tail_ns += meter.cpu_ns - before


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


def _package_threads_cpu() -> dict[str, float]:
    """CPU seconds so far of the threads the package starts (named ``llm-otel-*``)."""
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.name.startswith("llm-otel-") and thread.ident is not None:
            clock = time.pthread_getcpuclockid(thread.ident)
            out[thread.name] = out.get(thread.name, 0.0) + time.clock_gettime(clock)
    return out


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
        self._observers = {OBSERVED: engine._observer, TOKENCOUNTER: observer}
        self._plain = plain
        self._tokens = tokens
        self._counter = counter
        self._meters: dict[str, _StepCpu] = {}
        self._inner: dict[str, _StepCpu] = {}
        self._gc: _GcClock | None = None
        if os.environ.get("BENCH_STEP_CPU") == "1":
            self._gc = _GcClock()
            for path, server in ((PLAIN, plain), (OBSERVED, self), (TOKENCOUNTER, tokens)):
                inner = self._inner[path] = _StepCpu()
                if path == PLAIN:
                    server.engine = _MeteredEngine(raw, inner)
                else:  # the inner meter goes under the observer, right around the engine
                    server.engine = ObservedEngine(_MeteredEngine(raw, inner),
                                                   server.engine._observer)
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
        ``"inner"``: per path (requests, inner meter's ns, its tail ns); under ``"gc"``:
        collections and their CPU ns per generation; under ``"threads"``: CPU seconds so far of
        each thread the package runs, by name."""
        out: dict[str, Any] = {path: (m.requests, m.cpu_ns) for path, m in self._meters.items()}
        out["inner"] = {path: (m.requests, m.cpu_ns, m.tail_ns)
                        for path, m in self._inner.items()}
        if self._gc is not None:
            out["gc"] = {"count": list(self._gc.count), "cpu_ns": list(self._gc.cpu_ns)}
        out["threads"] = _package_threads_cpu()
        return out

    async def micro(self, requests: int = 400, repeat: int = 5) -> dict[str, Any]:
        """The observers of this replica in a tight loop on its own event loop, against a fake
        engine that yields pre-built chunks (``request_overhead.py``'s): per path, the best
        repeat's thread CPU per request on the loop, and the package threads' CPU per request
        in that repeat. Run with no load on the replica: the same code as under load, in the
        replica's process and heap, but with nothing interleaved between its steps."""
        from benchmarks.request_overhead import fake_engine, mixed_requests

        fake = fake_engine(16)

        def batch() -> list[Any]:
            return mixed_requests(requests, 16)

        async def run(path: str, reqs: list[Any]) -> None:
            for r in reqs:
                gen = (fake.chat(r) if path == PLAIN else
                       self._observers[path].observe("chat", fake.chat, r, None))
                async for _ in gen:
                    pass

        tel = _telemetry_of(self._llm_config.get_or_create_callback())
        out: dict[str, Any] = {}
        # The same metering layer as under load, alone: identical code on both sides of the
        # comparison, so its tight-loop cost against its cost under load is the slow-down
        # the replica's load puts on any code of the request path.
        for _ in range(repeat):
            inner, outer = _StepCpu(), _StepCpu()
            metered = _MeteredEngine(_MeteredEngine(fake, inner), outer)
            for r in batch():
                async for _item in metered.chat(r):
                    pass
            layer_us = (outer.cpu_ns - inner.cpu_ns) / requests / 1e3
            best_layer = out.get("metering layer")
            if best_layer is None or layer_us < best_layer["loop_us"]:
                out["metering layer"] = {"loop_us": layer_us, "threads_us": 0.0}
        for _ in range(repeat):
            for path in PATHS:
                reqs = batch()
                gc.collect()
                threads0 = sum(_package_threads_cpu().values())
                t0 = time.thread_time_ns()
                await run(path, reqs)
                loop_us = (time.thread_time_ns() - t0) / requests / 1e3
                await asyncio.to_thread(tel.force_flush, 30)  # their export and metric calls
                threads_us = (sum(_package_threads_cpu().values()) - threads0) * 1e6 / requests
                best = out.get(path)
                if best is None or loop_us < best["loop_us"]:
                    out[path] = {"loop_us": loop_us, "threads_us": threads_us}
        return out

    async def token_totals(self) -> dict[str, Any]:
        """TokenCounter's totals: proof that the tokencounter path ran its hook."""
        for child in self._counter.children:
            snapshot = getattr(child.instance, "snapshot", None)
            if snapshot is not None:
                return dict(snapshot())
        return {}
