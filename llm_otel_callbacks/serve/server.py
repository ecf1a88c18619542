"""ObservedLLMServer: Ray's LLMServer with engine-start hooks, request hooks and GenAI telemetry.

Set it as the deployment's server class::

    LLMConfig(..., server_cls="llm_otel_callbacks.serve.ObservedLLMServer",
              callback_config={"callback_class": "llm_otel_callbacks.Composite", ...})

It uses the replica's one callback instance (``llm_config.get_or_create_callback()``), so one
Composite configures the startup hooks and the request hooks alike.

Where requests go in Ray 2.60: the OpenAI ingress calls ``LLMServer.chat`` / ``completions`` /
``embeddings`` over a deployment handle, and those call the engine's method of the same name
(``LLMServer._run_request``), then batch streamed chunks. The server therefore wraps its engine
once it has started, so each engine call is observed before the batching. With
``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` the server instead serves vLLM's own ASGI app and
requests never reach those methods; request hooks and GenAI metrics do not see them there (a
warning says so), engine-start hooks still run.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import _sigterm
from .._ray import llm_server_class, llm_server_config
from .._request_hooks import RequestHooks
from ..base import HookTarget, RayServeLLMCallback
from ..catalog import HOOK_CALLS, HOOK_DURATION
from ..telemetry import TelemetrySettings, get_telemetry
from ..telemetry.providers import Telemetry
from ._engine import ObservedEngine, engine_error_types, make_error_response, provider_of
from ._engine_start import EngineStart
from ._requests import RequestObserver
from ._trace_headers import vllm_traces_requests

logger = logging.getLogger(__name__)

__all__ = ["LLMServer", "ObservedEngine", "ObservedLLMServer", "request_observer"]

LLMServer: Any = llm_server_class()


class ObservedLLMServer(LLMServer):  # type: ignore[misc,valid-type]
    """Ray's ``LLMServer``, observed. Everything else (LoRA, batching, health) is Ray's."""

    engine: Any

    async def start(self) -> None:
        llm_config = llm_server_config(self)
        if llm_config is None:
            logger.warning("llm_otel_callbacks: this Ray's LLMServer has no _llm_config; "
                           "the replica starts unobserved (supported Ray: see _ray.py)")
            await super().start()
            return
        try:
            callback = llm_config.get_or_create_callback()
        except Exception:
            # Ray's own start makes the same call and reports the error its way.
            await super().start()
            return
        model = str(llm_config.model_id)
        tel = _telemetry_of(callback)
        phase = EngineStart(callback, model, tel)
        if not phase.arm():
            await phase.begin()
        try:
            await super().start()
        except BaseException as exc:
            phase.failed(exc)
            raise
        await phase.ready()
        if self.engine is not None:
            observer = _request_observer(
                callback, model, tel, self.engine, vllm_traces_requests(llm_config)
            )
            if observer is not None:
                self.engine = ObservedEngine(self.engine, observer)

    async def __serve_build_asgi_app__(self) -> Any:
        logger.warning(
            "llm_otel_callbacks: direct streaming serves vLLM's ASGI app; request hooks and "
            "GenAI request telemetry do not see these requests (engine-start hooks did run)"
        )
        return await super().__serve_build_asgi_app__()


def _telemetry_of(callback: Any) -> Telemetry:
    if isinstance(callback, RayServeLLMCallback):
        return callback._observer.tel
    tel = get_telemetry(TelemetrySettings.resolve(None))
    _sigterm.watch(tel)  # a plain Ray callback: still flush the engine-start spans on SIGTERM
    return tel


def _targets_of(callback: Any) -> list[HookTarget]:
    if isinstance(callback, RayServeLLMCallback):
        return callback.hook_targets()
    return [
        HookTarget(type(callback).__name__, callback,
                   bool(getattr(callback, "raise_error_on_callback", True)))
    ]


def request_observer(
    callback: Any, model: str, engine: Any, tel: Telemetry | None = None
) -> RequestObserver | None:
    """The observer :class:`ObservedLLMServer` wraps ``engine`` in (``ObservedEngine(engine,
    observer)``) for ``callback``'s request hooks and telemetry; None when there is nothing to
    observe. ``tel``: the callback's own telemetry unless given (benchmarks pass their own)."""
    return _request_observer(callback, model, tel or _telemetry_of(callback), engine)


def _request_observer(
    callback: Any, model: str, tel: Telemetry, engine: Any, trace_into_engine: bool = False
) -> RequestObserver | None:
    """The per-replica observer, or None when there is nothing to do per request."""
    settings = getattr(callback, "telemetry_settings", tel.settings)
    hooks = RequestHooks(_targets_of(callback), tel.recorder(HOOK_CALLS), model,
                         durations=tel.recorder(HOOK_DURATION),
                         record_exception_messages=settings.record_exception_messages)
    if not hooks.any and not tel.settings.enabled:
        return None
    return RequestObserver(
        model=model,
        provider=provider_of(engine),
        tel=tel,
        hooks=hooks,
        error_response=make_error_response,
        error_types=engine_error_types(),
        record_exception_messages=settings.record_exception_messages,
        client_error_messages=settings.client_error_messages,
        trace_into_engine=trace_into_engine,
    )
