"""The engine-start phase of a replica: node init done -> engine ready.

Ray 2.60's ``VLLMEngine.start()`` runs the node-init hooks and then builds vLLM, with no await
point of ours in between. The phase therefore begins in a follow-up the callback awaits right
after its ``on_after_node_init`` dispatch (:meth:`RayServeLLMCallback.call_after_node_init`):
the ``engine_start`` span opens under the replica's startup span and ``on_before_engine_start``
runs; when ``LLMServer.start()`` returns, the span closes, ``on_after_engine_start`` runs and
the startup span ends (the server asked the callback to keep it open past node init). A start
that fails ends both spans with the error.

For a callback that is not a :class:`RayServeLLMCallback` (Ray's plain ``CallbackBase``) there
is no follow-up: the phase then begins just before Ray's engine start (node init included).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from .. import catalog
from .._init_output import SEED_CTX_KEY
from .._ray import hook_method
from ..base import RayServeLLMCallback
from ..builtin.timing import Timing
from ..telemetry.providers import Telemetry
from ..vllm_plugin._replica import EnginePhases

logger = logging.getLogger(__name__)

BEFORE = "on_before_engine_start"
AFTER = "on_after_engine_start"


def dispatches(callback: Any, hook: str) -> bool:
    """Whether ``callback.run_callback(hook)`` has anything to call (Ray's base raises
    AttributeError for a hook the class lacks; a composite dispatches any hook)."""
    try:
        if isinstance(callback, RayServeLLMCallback):
            callback._method(hook)
        else:
            hook_method(callback, hook)
    except AttributeError:
        return False
    return True


def merge_extra_init_kwargs(callback: Any) -> None:
    """Seed ``extra_init_kwargs`` (set by seed hooks, phase functions or an ``initialize()``
    child) go into the engine kwargs now: Ray builds the engine config from them next."""
    ctx = getattr(callback, "ctx", None)
    seed = ctx.custom_data.get(SEED_CTX_KEY) if ctx is not None else None
    extra = (seed or {}).get("extra_init_kwargs")
    if extra:
        callback.llm_config.update_engine_kwargs(**extra)
        logger.info("merged extra_init_kwargs %s into the engine kwargs", sorted(extra))


class EngineStart:
    """Spans, hooks and the Timing phase around one replica's engine start."""

    def __init__(self, callback: Any, model: str, tel: Telemetry) -> None:
        self.callback = callback
        self.model = model
        self.tel = tel
        self.ours = isinstance(callback, RayServeLLMCallback)
        self.span: Span | None = None
        self.started_ns: int | None = None
        self.ended = False
        #: The phases inside vLLM's processes (None until the span opens, or when off).
        self.phases: EnginePhases | None = None

    def arm(self) -> bool:
        """Hook the phase onto node init's end; False when that is not possible."""
        if not self.ours or not hasattr(self.callback, "call_after_node_init"):
            return False
        self.callback.defer_startup_end()
        self.callback.call_after_node_init(self.begin)
        return True

    async def begin(self) -> None:
        if self.started_ns is not None:
            return
        self.started_ns = time.time_ns()
        parent = self.callback.startup_context() if self.ours else None
        self.span = self.tel.tracer.start_span(
            catalog.SPAN_ENGINE_START,
            context=parent,
            start_time=self.started_ns,
            attributes={catalog.A_MODEL: self.model, catalog.A_PHASE: catalog.PHASE_ENGINE_START},
        )
        # Before Ray builds vLLM: its processes inherit the request for their phases.
        self.phases = EnginePhases.open(self.model, self.tel, self.span, self.started_ns)
        if dispatches(self.callback, BEFORE):
            await self.callback.run_callback(BEFORE)  # raises under the raise policy
        merge_extra_init_kwargs(self.callback)

    async def ready(self) -> None:
        """The engine is up: close the span, run ``on_after_engine_start``, end the startup."""
        if self.started_ns is None:  # node init never signalled (should not happen)
            await self.begin()
        self._end(None)
        if dispatches(self.callback, AFTER):
            await self.callback.run_callback(AFTER)  # on error, base ends the startup too
        if self.ours:
            self.callback.end_startup()

    def failed(self, error: BaseException) -> None:
        """The engine start failed (or a hook raised): end the spans with the error."""
        if self.started_ns is None:
            self.started_ns = time.time_ns()
        self._end(error)
        if self.ours:
            self.callback.end_startup(error)

    def _end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        end_ns = time.time_ns()
        outcome = catalog.OUTCOME_OK if error is None else catalog.OUTCOME_ERROR
        try:
            span = self.span
            failed_phase = None
            if self.phases is not None:
                self.phases.close(end_ns, error)
                failed_phase = self.phases.failed_phase
            if span is not None:
                span.set_attribute(catalog.A_OUTCOME, outcome)
                if error is not None:
                    where = f" (in phase {failed_phase})" if failed_phase else ""
                    span.set_attribute("error.type", type(error).__qualname__)
                    # The message only when the setting allows it (it may hold a secret).
                    settings = getattr(self.callback, "telemetry_settings", self.tel.settings)
                    detail = f": {error}" if settings.record_exception_messages else ""
                    span.set_status(
                        Status(StatusCode.ERROR, f"{type(error).__name__}{where}{detail}")
                    )
                span.end(end_time=end_ns)
            if not self._timing_records_it():
                seconds = (end_ns - (self.started_ns or end_ns)) / 1e9
                self.tel.recorder(catalog.STARTUP_PHASE_DURATION).record(
                    (self.model, catalog.PHASE_ENGINE_START, "", outcome), seconds
                )
        except Exception as exc:  # telemetry never fails the start
            logger.debug("engine start telemetry not recorded: %s", exc)

    def _timing_records_it(self) -> bool:
        """A Timing callback (or composite child) records the phase from the hooks itself."""
        if isinstance(self.callback, Timing):
            return True
        if not self.ours:
            return False
        return any(isinstance(t.instance, Timing) for t in self.callback.hook_targets())
