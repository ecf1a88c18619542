"""The replica's side of the engine phases: ask vLLM's processes for them, then account.

:meth:`EnginePhases.open` runs when the engine-start span opens, before Ray builds vLLM: it
binds a UDP socket on 127.0.0.1 for the phase reports and puts the config and the span's W3C
``TRACEPARENT`` into ``os.environ`` (vLLM spawns its engine core from here, and the workers from
there, so both inherit them). :meth:`EnginePhases.close` runs when the engine start ends: it
restores the environment, reads the reports, records the two replica-side phases
(``engine_config``: until the engine-core process exists; ``engine_frontend_ready``: from the
engine core being ready to the end), puts every phase into ``startup_phase_duration_seconds``,
and sets on the engine-start span how much of it the phases explain and, when the start
failed, which phase failed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from .. import catalog
from ..builtin._common import this_node_id
from ..telemetry.propagation import carrier_for
from ..telemetry.providers import Telemetry
from ._wire import ENV_CONFIG, ENV_TRACEPARENT, ENV_TRACESTATE, EngineEnv, PhaseReport, receive_all

logger = logging.getLogger(__name__)

_SERVE_KEYS = (catalog.R_SERVE_APP, catalog.R_SERVE_DEPLOYMENT, catalog.R_SERVE_REPLICA)
_ENV_KEYS = (ENV_CONFIG, ENV_TRACEPARENT, ENV_TRACESTATE)
# How long a failed start waits for the last reports of processes that are still exiting.
_FAILED_GRACE_S = 0.5


@dataclass
class Interval:
    phase: str
    start_ns: int
    end_ns: int


class EnginePhases:
    """One engine start's phases, seen from the replica."""

    def __init__(self, model: str, tel: Telemetry, span: Span, started_ns: int) -> None:
        self.model = model
        self.tel = tel
        self.span = span
        self.started_ns = started_ns
        self.node = this_node_id()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)
        self._saved: dict[str, str | None] = {}
        self.reports: list[PhaseReport] = []
        self.coverage: float | None = None
        self.failed_phase: str | None = None

    @classmethod
    def open(cls, model: str, tel: Telemetry, span: Span, started_ns: int) -> EnginePhases | None:
        """Ask vLLM's processes for their phases; None when telemetry is off (nothing asked)."""
        if not tel.settings.enabled:
            return None
        try:
            phases = cls(model, tel, span, started_ns)
            phases._set_environment()
            return phases
        except Exception as exc:  # telemetry never fails an engine start
            logger.debug("engine phases not requested: %s", exc)
            return None

    def _set_environment(self) -> None:
        settings = self.tel.settings
        data = settings.model_dump(mode="json")
        data["headers"] = {k: v.get_secret_value() for k, v in settings.headers.items()}
        attrs = self.tel.process_attributes
        env = EngineEnv(
            model=self.model,
            report_port=self._sock.getsockname()[1],
            node=self.node,
            telemetry=data,
            resource={k: str(attrs[k]) for k in _SERVE_KEYS if attrs.get(k)},
        )
        carrier = carrier_for(self.span)
        values = {
            ENV_CONFIG: env.dumps(),
            ENV_TRACEPARENT: carrier.get("traceparent"),
            ENV_TRACESTATE: carrier.get("tracestate"),
        }
        for key in _ENV_KEYS:
            value = values[key]
            if value:  # no span context of ours: a TRACEPARENT set by someone else stays
                self._saved[key] = os.environ.get(key)
                os.environ[key] = value

    def _restore_environment(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved.clear()

    def close(self, end_ns: int, error: BaseException | None) -> None:
        """The engine start ended (``error`` when it failed); never raises."""
        try:
            self._restore_environment()
            self.reports = receive_all(self._sock)
            # A failed start: processes may still be exiting (their last reports on the way).
            # A good one: the engine core's ready report left before its READY message, but
            # datagrams and messages are not ordered with each other.
            deadline = time.monotonic() + (_FAILED_GRACE_S if error is not None else 0.2)
            while time.monotonic() < deadline and (error is not None or not self._ready_seen()):
                time.sleep(0.02)
                self.reports += receive_all(self._sock)
            self._sock.close()
            self._account(end_ns, error)
        except Exception as exc:
            logger.debug("engine phases not accounted: %s", exc)

    def _ready_seen(self) -> bool:
        """True once the engine core reported ready, or when there is no engine core."""
        phases = {r.phase for r in self.reports if r.end_ns is not None}
        return catalog.PHASE_ENGINE_CORE_SETUP in phases or not self.reports

    def _account(self, end_ns: int, error: BaseException | None) -> None:
        ended = [r for r in self.reports if r.end_ns is not None]
        done = {(r.pid, r.phase, r.start_ns) for r in ended}
        still_open = [
            r for r in self.reports if r.end_ns is None and (r.pid, r.phase, r.start_ns) not in done
        ]
        core_starts = [
            r.start_ns for r in ended if r.phase == catalog.PHASE_ENGINE_CORE_BOOT
        ]
        ready = [r.end_ns for r in ended if r.phase == catalog.PHASE_ENGINE_CORE_SETUP]
        intervals: list[Interval] = []
        # Replica side: before the engine core exists, and after it said ready.
        if core_starts:
            config_end = max(min(core_starts), self.started_ns)
            self._replica_phase(catalog.PHASE_ENGINE_CONFIG, self.started_ns, config_end, None)
            intervals.append(Interval(catalog.PHASE_ENGINE_CONFIG, self.started_ns, config_end))
        elif error is not None:
            self.failed_phase = catalog.PHASE_ENGINE_CONFIG
            self._replica_phase(catalog.PHASE_ENGINE_CONFIG, self.started_ns, end_ns, error)
        if ready and error is None:
            start = min(e for e in ready if e is not None)
            self._replica_phase(catalog.PHASE_ENGINE_FRONTEND_READY, start, end_ns, None)
            intervals.append(Interval(catalog.PHASE_ENGINE_FRONTEND_READY, start, end_ns))
        for r in ended:
            assert r.end_ns is not None
            intervals.append(Interval(r.phase, r.start_ns, r.end_ns))
            self._metric(r.phase, (r.end_ns - r.start_ns) / 1e9, r.node, r.error)
        # A phase a process began but never reported ending: the process died in it.
        for r in still_open:
            self._stand_in(r, end_ns)
            intervals.append(Interval(r.phase, r.start_ns, end_ns))
        if error is not None and self.failed_phase is None:
            self.failed_phase = _failed_phase(ended, still_open)
        self.coverage = coverage(intervals, self.started_ns, end_ns)
        self.span.set_attribute(catalog.A_PHASE_COVERAGE, round(self.coverage, 4))
        if self.failed_phase is not None:
            self.span.set_attribute(catalog.A_FAILED_PHASE, self.failed_phase)

    def _replica_phase(
        self, phase: str, start_ns: int, end_ns: int, error: BaseException | None
    ) -> None:
        attrs: dict[str, Any] = {
            catalog.A_PHASE: phase,
            catalog.A_MODEL: self.model,
            catalog.A_ENGINE_ROLE: catalog.ROLE_REPLICA,
            catalog.A_PID: os.getpid(),
            catalog.A_OUTCOME: catalog.OUTCOME_OK if error is None else catalog.OUTCOME_ERROR,
        }
        if self.node:
            attrs[catalog.A_NODE_ID] = self.node
        span = self.tel.tracer.start_span(
            catalog.SPAN_PHASE_PREFIX + phase, context=_context_of(self.span),
            start_time=start_ns, attributes=attrs,
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"
                                   if self.tel.settings.record_exception_messages
                                   else type(error).__name__))
        span.end(end_time=max(end_ns, start_ns))
        self._metric(phase, (end_ns - start_ns) / 1e9, self.node, None if error is None else "e")

    def _stand_in(self, report: PhaseReport, end_ns: int) -> None:
        """The span of a phase whose process died before it could end it (killed)."""
        attrs: dict[str, Any] = {
            catalog.A_PHASE: report.phase,
            catalog.A_MODEL: self.model,
            catalog.A_ENGINE_ROLE: report.role,
            catalog.A_PID: report.pid,
            catalog.A_OUTCOME: catalog.OUTCOME_ERROR,
        }
        if report.rank is not None:
            attrs[catalog.A_ENGINE_RANK] = report.rank
        span = self.tel.tracer.start_span(
            catalog.SPAN_PHASE_PREFIX + report.phase, context=_context_of(self.span),
            start_time=report.start_ns, attributes=attrs,
        )
        span.set_status(Status(StatusCode.ERROR, "the process ended during this phase"))
        span.end(end_time=max(end_ns, report.start_ns))
        self._metric(report.phase, (end_ns - report.start_ns) / 1e9, report.node, "e")

    def _metric(self, phase: str, seconds: float, node: str, error: str | None) -> None:
        outcome = catalog.OUTCOME_OK if error is None else catalog.OUTCOME_ERROR
        try:
            self.tel.recorder(catalog.STARTUP_PHASE_DURATION).record(
                (self.model, phase, node or "", outcome), max(seconds, 0.0)
            )
        except Exception as exc:
            logger.debug("engine phase metric not recorded: %s", exc)


def _failed_phase(ended: list[PhaseReport], still_open: list[PhaseReport]) -> str | None:
    """The phase a failed start died in. A worker's phase is more precise than the engine
    core's phase that waited for it; one that ended with an error, than one left open (its
    process was killed in it); among several, the earliest to fail."""
    failed = sorted((r for r in ended if r.error), key=lambda r: r.end_ns or 0)
    left = sorted(still_open, key=lambda r: -r.start_ns)
    for candidates in (
        [r for r in failed if r.role == catalog.ROLE_WORKER],
        [r for r in left if r.role == catalog.ROLE_WORKER],
        failed,
        left,
    ):
        if candidates:
            return candidates[0].phase
    return None


def coverage(intervals: list[Interval], start_ns: int, end_ns: int) -> float:
    """Share of [start, end] covered by the union of the intervals."""
    total = end_ns - start_ns
    if total <= 0:
        return 0.0
    clipped = sorted(
        (max(i.start_ns, start_ns), min(i.end_ns, end_ns)) for i in intervals
        if i.end_ns > start_ns and i.start_ns < end_ns
    )
    covered = 0
    cur_start: int | None = None
    cur_end = 0
    for s, e in clipped:
        if cur_start is None or s > cur_end:
            if cur_start is not None:
                covered += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_start is not None:
        covered += cur_end - cur_start
    return covered / total


def _context_of(span: Span) -> Any:
    from opentelemetry.trace import set_span_in_context

    return set_span_in_context(span)
