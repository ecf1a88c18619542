"""Timing: where did a replica's startup minutes go?

Each phase of one replica's startup becomes a span (``startup_phase <phase>``, under the
replica's startup span) and a point of ``llm_callback_startup_phase_duration_seconds``
labelled by phase, node and outcome. Built-in phases (names in :mod:`..catalog`):

=======================  =======================================================  =======
phase                    from -> to                                               where
=======================  =======================================================  =======
``before_node_init``     callback created -> ``on_before_node_init``              replica
``node_init``            ``on_before_node_init`` -> ``on_after_node_init``        replica
``download_task_start``  ``on_before_node_init`` -> that node's download hook     node
``engine_start``         ``on_before_engine_start`` -> ``on_after_engine_start``  replica
``total``                callback created -> end of the startup (metric only)     replica
=======================  =======================================================  =======

Nothing waits for ``on_after_node_init``: a replica whose startup fails (a hook raising, the
process exiting, or a server wrapper calling ``end_startup(error)``) gets its open phases ended
with an error status in :meth:`Timing.startup_ended`, and the attempt is counted in the
``total`` phase with ``outcome="error"``. One summary line per replica is logged when its
startup ends.

``download_task_start`` is measured in the download task's process: its start is the replica's
clock (carried in the pickle), its end that node's clock, so on a real cluster it includes the
clock offset between the two machines (small with NTP; never negative here).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .. import Number, RayServeLLMCallback, catalog
from ._common import error_text, say, short_id, this_node_id, upper_name, watch_exit

logger = logging.getLogger(__name__)

LogLevel = Literal["DEBUG", "INFO", "WARNING"]

_OPEN = "timing.open"  # process_cache keys: open phases, finished phases, parent context
_DONE = "timing.done"
_PARENT = "timing.parent"
_COUNTED = "timing.counted"


class TimingOptions(BaseModel):
    """``callback_kwargs`` of :class:`Timing`."""

    model_config = ConfigDict(defer_build=True, extra="forbid")

    log_summary: bool = True
    """Log one summary line per replica when its startup ends."""
    summary_log_level: Annotated[LogLevel, BeforeValidator(upper_name)] = "INFO"
    """Level of the summary line (any case)."""
    warn_after_s: Number | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Log the summary at WARNING when the startup took longer than this."""


@dataclass(frozen=True)
class PhaseRecord:
    """One finished phase, as the summary line shows it."""

    name: str
    seconds: float
    node: str | None
    outcome: str


class Timing(RayServeLLMCallback):
    """Replica startup waterfall: one span and one histogram point per phase.

    Override points:

    * :meth:`record_phase` -- the one method to add a phase of your own: call it from any hook
      with start/end timestamps (``time.time_ns()``); it makes the span and the metric point.
    * the hooks (``on_before_node_init`` ...): extend them and call ``super()`` first, so the
      built-in phases keep their boundaries.
    * :meth:`startup_ended` -- extend it (calling ``super()``) to close phases of your own that
      may still be open when a startup fails.
    * :meth:`summary_line` -- the text of the per-replica log line.
    """

    kwargs_model: ClassVar[type[BaseModel] | None] = TimingOptions
    server_hooks_optional = True  # its engine phase is telemetry only

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set in the replica before the pickle, read on every node's download task.
        self.node_init_started_ns: int | None = None

    # --- the one method for phases ----------------------------------------------------------

    def record_phase(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        node: str | None = None,
        error: BaseException | str | None = None,
    ) -> float:
        """Record one startup phase: a span under the replica's startup trace and a point of
        ``llm_callback_startup_phase_duration_seconds`` (labels: phase, node, outcome).

        ``start_ns``/``end_ns`` are ``time.time_ns()`` values (the end is clamped to the start).
        ``node``: the Ray node the phase is about (a bounded label), or None. ``error``: the
        phase failed (span status ERROR, ``outcome="error"``). Returns the duration in seconds.
        Works in the replica and in a per-node download task; never raises.
        """
        end_ns = max(end_ns, start_ns)
        seconds = (end_ns - start_ns) / 1e9
        outcome = catalog.OUTCOME_OK if error is None else catalog.OUTCOME_ERROR
        try:
            exemplar = self._phase_span(name, start_ns, end_ns, node, error)
            self._phase_metric(name, seconds, node, outcome, exemplar)
            done: list[PhaseRecord] = self.process_cache.setdefault(_DONE, [])
            done.append(PhaseRecord(name, seconds, node, outcome))
        except Exception as exc:  # telemetry must never hurt the startup
            say(logger, logging.WARNING, f"Timing: could not record phase {name}: {exc}")
        return seconds

    def _phase_metric(self, name: str, seconds: float, node: str | None, outcome: str,
                      exemplar: SpanContext | None = None) -> None:
        self.metric(catalog.STARTUP_PHASE_DURATION).record(
            (self.model_id, name, node or "", outcome), seconds, exemplar
        )

    def _phase_span(
        self, name: str, start_ns: int, end_ns: int, node: str | None,
        error: BaseException | str | None,
    ) -> SpanContext | None:
        """The phase's span; returns its context when it records (the metric's exemplar)."""
        attrs: dict[str, Any] = {
            catalog.A_PHASE: name,
            catalog.A_MODEL: self.model_id,
            catalog.A_CALLBACK: self.callback_name,
            catalog.A_OUTCOME: catalog.OUTCOME_OK if error is None else catalog.OUTCOME_ERROR,
        }
        if node:
            attrs[catalog.A_NODE_ID] = node
        span = self.tracer.start_span(
            catalog.SPAN_PHASE_PREFIX + name,
            context=self._phase_parent(),
            start_time=start_ns,
            attributes=attrs,
        )
        if error is not None:
            message = error_text(error, self.telemetry_settings.record_exception_messages)
            span.set_status(Status(StatusCode.ERROR, message))
            if isinstance(error, BaseException):
                span.set_attribute("error.type", type(error).__qualname__)
        exemplar = span.get_span_context() if span.is_recording() else None
        span.end(end_time=end_ns)
        return exemplar

    def _phase_parent(self) -> Context | None:
        # Remember the startup span's context: a phase recorded after the startup span has
        # ended (a late engine_start) must still join that trace, not open a new one.
        cache = self.process_cache
        parent: Context | None = cache.get(_PARENT)
        if parent is None:
            parent = self.startup_context()
            span_ctx = trace.get_current_span(parent).get_span_context()
            if span_ctx.is_valid:
                parent = trace.set_span_in_context(NonRecordingSpan(span_ctx))
                cache[_PARENT] = parent
        return parent

    # --- open phases (replica) ----------------------------------------------------------------

    def _begin(self, name: str, start_ns: int) -> None:
        self.process_cache.setdefault(_OPEN, {})[name] = start_ns

    def _finish(self, name: str, end_ns: int, error: BaseException | str | None = None) -> None:
        start = self.process_cache.setdefault(_OPEN, {}).pop(name, None)
        if start is not None:
            self.record_phase(name, start, end_ns, error=error)

    # --- hooks --------------------------------------------------------------------------------

    def on_before_node_init(self) -> None:
        now = time.time_ns()
        self.node_init_started_ns = now  # travels to the nodes with the pickle
        watch_exit()
        self._phase_parent()  # opens the startup trace before the pickle carries it
        if not self.process_cache.get(_COUNTED):
            self.process_cache[_COUNTED] = True
            self._starting_gauge(+1)
        self.record_phase(catalog.PHASE_BEFORE_NODE_INIT, self.created_at_ns, now)
        self._begin(catalog.PHASE_NODE_INIT, now)

    def on_before_download_model_files_distributed(self) -> None:
        now = time.time_ns()
        started = self.node_init_started_ns
        if started is None:  # the hook was called outside Ray's node initialization
            return
        node = this_node_id()
        seconds = self.record_phase(catalog.PHASE_DOWNLOAD_TASK_START, started, now, node=node)
        for name, start_ns, end_ns in download_task_parts(started, now):
            self.record_phase(name, start_ns, end_ns, node=node)
        logger.info(
            "Timing: model '%s': download task on node %s started %.1fs after node init began",
            self.model_id, short_id(node), seconds,
        )

    def on_after_node_init(self) -> None:
        self._finish(catalog.PHASE_NODE_INIT, time.time_ns())

    def on_before_engine_start(self) -> None:
        self._begin(catalog.PHASE_ENGINE_START, time.time_ns())

    def on_after_engine_start(self) -> None:
        self._finish(catalog.PHASE_ENGINE_START, time.time_ns())

    # --- the end of the startup ---------------------------------------------------------------

    def startup_ended(self, error: BaseException | str | None) -> None:
        """Close still-open phases (with ``error``'s status), update the gauge, log the
        summary. Called once per replica, on success or failure (see the base class)."""
        now = time.time_ns()
        open_phases: dict[str, int] = self.process_cache.setdefault(_OPEN, {})
        for name in list(open_phases):
            # Without an error, a phase still open simply ends with the startup.
            self._finish(name, now, error)
        total = (now - self.created_at_ns) / 1e9
        outcome = catalog.OUTCOME_OK if error is None else catalog.OUTCOME_ERROR
        try:
            self._phase_metric(catalog.PHASE_TOTAL, total, None, outcome)
        except Exception as exc:
            say(logger, logging.WARNING, f"Timing: could not record the total: {exc}")
        if self.process_cache.pop(_COUNTED, False):
            self._starting_gauge(-1)
        options: TimingOptions = self.options
        if options.log_summary:
            level = logging.getLevelName(options.summary_log_level)
            if error is not None or (options.warn_after_s and total > options.warn_after_s):
                level = logging.WARNING
            say(logger, level, self.summary_line(total, error))

    def summary_line(self, total_s: float, error: BaseException | str | None) -> str:
        """The per-replica summary, e.g. ``Timing: replica of model 'm' started in 41.2s:
        before_node_init 0.4s, node_init 12.1s, engine_start 28.5s``."""
        done: list[PhaseRecord] = self.process_cache.get(_DONE, [])
        parts = []
        for rec in done:
            label = rec.name if rec.node is None else f"{rec.name}[{short_id(rec.node)}]"
            flag = "" if rec.outcome == catalog.OUTCOME_OK else f" ({rec.outcome})"
            parts.append(f"{label} {rec.seconds:.1f}s{flag}")
        replica = self.process_attributes.get(catalog.R_SERVE_REPLICA)
        who = f"replica {replica}" if replica else "replica"
        if error is None:
            verdict = f"started in {total_s:.1f}s"
        else:
            text = error_text(error, self.telemetry_settings.record_exception_messages)
            verdict = f"failed after {total_s:.1f}s ({text})"
        return (
            f"Timing: {who} of model '{self.model_id}' {verdict}: "
            + (", ".join(parts) or "no phases recorded")
        )

    def _starting_gauge(self, delta: float) -> None:
        try:
            self.metric(catalog.REPLICAS_STARTING).add((self.model_id,), delta)
        except Exception as exc:
            say(logger, logging.WARNING, f"Timing: replicas_starting gauge not updated: {exc}")


def download_task_parts(started_ns: int, hook_ns: int) -> list[tuple[str, int, int]]:
    """``download_task_start`` split in the task's own process: (phase, start, end).

    Ray's worker main (``ray/_private/workers/default_worker.py``, this process's ``__main__``)
    keeps the time the raylet launched it (``--worker-launch-time-ms``) and the time its own
    imports were done (``worker_launched_time_ms``). Empty when the task ran in a worker that
    existed before node init began (a reused or prestarted one: nothing of it was this
    startup's) or when Ray's worker main does not keep those times.
    """
    try:
        main = sys.modules.get("__main__")
        launch_ms = float(getattr(getattr(main, "args", None), "worker_launch_time_ms", -1))
        launched_ms = float(getattr(main, "worker_launched_time_ms", -1))
    except (TypeError, ValueError):
        return []
    launch, launched = int(launch_ms * 1e6), int(launched_ms * 1e6)
    if launch_ms <= 0 or launched_ms <= 0:
        return []
    if launch < started_ns or not launch <= launched <= hook_ns:
        return []
    return [
        (catalog.PHASE_DOWNLOAD_TASK_SCHEDULING, started_ns, launch),
        (catalog.PHASE_DOWNLOAD_TASK_WORKER_START, launch, launched),
        (catalog.PHASE_DOWNLOAD_TASK_IMPORTS, launched, hook_ns),
    ]
