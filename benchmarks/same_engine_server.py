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

``ObservedLLMServer`` changes nothing per request except the engine object that
``LLMServer._run_request`` calls, so the three paths differ only in that object. The path
choice (one attribute read, one comparison) is the same for all three. Only ``chat`` is routed;
the load sends chat requests only.
"""

from __future__ import annotations

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

    async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        path = request.user
        if path == PLAIN:
            return await self._plain.chat(request, raw_request_info)
        if path == TOKENCOUNTER:
            return await self._tokens.chat(request, raw_request_info)
        return await super().chat(request, raw_request_info)

    async def token_totals(self) -> dict[str, Any]:
        """TokenCounter's totals: proof that the tokencounter path ran its hook."""
        for child in self._counter.children:
            snapshot = getattr(child.instance, "snapshot", None)
            if snapshot is not None:
                return dict(snapshot())
        return {}
