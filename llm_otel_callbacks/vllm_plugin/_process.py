"""One vLLM process's engine-start phases: spans under the replica's engine-start span.

Runs only when the replica asked (the entry point checked the environment). The role comes
from who called vLLM's ``load_general_plugins``: ``EngineCore.__init__`` (engine core) or
``WorkerWrapperBase.init_worker`` (a worker; its rank is in the call's kwargs); failing that,
from the process name vLLM gives (``EngineCore``, ``VllmWorker-<rank>``). Any other caller (the
replica's own front end, which loads plugins while building the engine config) records nothing.

Spans go through this package's bounded span queue (an ended span is only appended; one
exporter thread sends), so a phase never waits for a collector. At exit (vLLM turns SIGTERM into
SystemExit in these processes) phases still open end with an error status, then the telemetry
flushes within ``shutdown_timeout_s``.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import re
import threading
import time
from types import FrameType
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import catalog
from ._wire import ENV_TRACEPARENT, ENV_TRACESTATE, EngineEnv, PhaseReport, Reporter

logger = logging.getLogger(__name__)

_ACTIVE: PhaseRecorder | None = None


class PhaseRecorder:
    """Begins and ends this process's phases; each is a span and a report to the replica."""

    def __init__(self, env: EngineEnv, role: str, rank: int | None) -> None:
        from ..telemetry import TelemetrySettings, get_telemetry

        self.env = env
        self.role = role
        self.rank = rank
        self.pid = os.getpid()
        settings = dict(env.telemetry)
        resource = dict(settings.get("resource_attributes") or {})
        resource.update(env.resource)
        settings.update(
            resource_attributes=resource, metrics_backend="none", otlp_metrics=False,
            prometheus_port=None, install_global_provider=False,
        )
        self.tel = get_telemetry(TelemetrySettings(**settings))
        self.parent = _parent_context()
        self.reporter = Reporter(env.report_port)
        self._open: dict[int, tuple[str, Span, int]] = {}
        self._lock = threading.Lock()
        atexit.register(self.end_open_phases)  # after Telemetry's: runs before its flush

    def attributes(self, phase: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            catalog.A_PHASE: phase,
            catalog.A_MODEL: self.env.model,
            catalog.A_ENGINE_ROLE: self.role,
            catalog.A_PID: self.pid,
        }
        if self.rank is not None:
            attrs[catalog.A_ENGINE_RANK] = self.rank
        if self.env.node:
            attrs[catalog.A_NODE_ID] = self.env.node
        return attrs

    def begin(self, phase: str, start_ns: int | None = None) -> int | None:
        """Open a phase; returns a token for :meth:`end` (None when it could not open)."""
        try:
            start_ns = start_ns or time.time_ns()
            span = self.tel.tracer.start_span(
                catalog.SPAN_PHASE_PREFIX + phase, context=self.parent, start_time=start_ns,
                attributes=self.attributes(phase),
            )
            with self._lock:
                token = id(span)
                self._open[token] = (phase, span, start_ns)
            self.reporter.send(self._report(phase, start_ns, None, None))
            return token
        except Exception:
            logger.debug("engine phase %s not begun", phase, exc_info=True)
            return None

    def end(
        self, token: int | None, error: BaseException | str | None = None,
        attrs: dict[str, Any] | None = None, end_ns: int | None = None,
    ) -> None:
        if token is None:
            return
        try:
            with self._lock:
                entry = self._open.pop(token, None)
            if entry is None:
                return
            phase, span, start_ns = entry
            end_ns = max(end_ns or time.time_ns(), start_ns)
            text = None
            if attrs:
                span.set_attributes(attrs)
            if error is not None:
                text = _error_text(error, self.tel.settings.record_exception_messages)
                span.set_status(Status(StatusCode.ERROR, text))
                if isinstance(error, BaseException):
                    span.set_attribute(catalog.A_ERROR_TYPE, type(error).__qualname__)
            span.set_attribute(
                catalog.A_OUTCOME, catalog.OUTCOME_OK if error is None else catalog.OUTCOME_ERROR
            )
            span.end(end_time=end_ns)
            self.reporter.send(self._report(phase, start_ns, end_ns, text or _flag(error)))
        except Exception:
            logger.debug("engine phase not ended", exc_info=True)

    def record(self, phase: str, start_ns: int, end_ns: int) -> None:
        """A phase that already happened (e.g. the process's boot)."""
        self.end(self.begin(phase, start_ns), end_ns=end_ns)

    def end_open_phases(self) -> None:
        """At exit: a phase still open did not finish (the process is going away)."""
        with self._lock:
            tokens = list(self._open)
        for token in tokens:
            self.end(token, "the process exited during this phase")

    def _report(
        self, phase: str, start_ns: int, end_ns: int | None, error: str | None
    ) -> PhaseReport:
        return PhaseReport(
            phase=phase, role=self.role, pid=self.pid, start_ns=start_ns, end_ns=end_ns,
            rank=self.rank, node=self.env.node, error=error,
        )


def activate(caller: FrameType | None) -> None:
    """Called once per vLLM process by the entry point (the env config is present)."""
    global _ACTIVE
    if _ACTIVE is not None:
        return
    loaded_ns = time.time_ns()
    env = EngineEnv.from_environ()
    if env is None:
        return
    role, rank, owners = _role_of(caller)
    if role is None:
        return  # the replica's own front end, or a caller we do not know: nothing to record
    recorder = PhaseRecorder(env, role, rank)
    _ACTIVE = recorder
    boot = (
        catalog.PHASE_ENGINE_CORE_BOOT if role == catalog.ROLE_ENGINE_CORE
        else catalog.PHASE_WORKER_BOOT
    )
    recorder.record(boot, process_start_ns(loaded_ns), loaded_ns)
    from ._points import install

    install(recorder, owners)


def _role_of(caller: FrameType | None) -> tuple[str | None, int | None, dict[str, Any]]:
    """(role, rank, the objects the call site knows: executor class, worker config)."""
    owners: dict[str, Any] = {}
    try:
        if caller is not None:
            code = caller.f_code
            local = caller.f_locals
            if code.co_name == "init_worker":
                kwargs = local.get("kwargs") or {}
                owners["vllm_config"] = local.get("vllm_config")
                rank = kwargs.get("rank")
                return catalog.ROLE_WORKER, rank if isinstance(rank, int) else None, owners
            if code.co_name == "__init__" and "executor_class" in local:
                owners["engine_core"] = local.get("self")
                owners["executor_class"] = local.get("executor_class")
                return catalog.ROLE_ENGINE_CORE, None, owners
    except Exception:
        logger.debug("engine phases: caller not recognised", exc_info=True)
    name = multiprocessing.current_process().name
    if name.startswith("EngineCore"):
        return catalog.ROLE_ENGINE_CORE, None, owners
    match = re.fullmatch(r"VllmWorker-(\d+)", name)
    if match:
        return catalog.ROLE_WORKER, int(match.group(1)), owners
    return None, None, owners


def process_start_ns(fallback: int) -> int:
    """When this process started, in ``time.time_ns()`` terms.

    From the kernel's start time in clock ticks since boot and ``/proc/uptime`` (10 ms), not
    psutil's ``create_time()``, which adds the boot time rounded to whole seconds and so can
    put a process's start up to a second before its parent's request for it.
    """
    try:
        now = time.time_ns()
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime_s = float(fh.read().split()[0])
        started_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat
        return now - int((uptime_s - started_s) * 1e9)
    except Exception:
        pass
    try:
        import psutil

        return int(psutil.Process().create_time() * 1e9)
    except Exception:
        return fallback


def _parent_context() -> Context | None:
    carrier = {}
    if os.environ.get(ENV_TRACEPARENT):
        carrier["traceparent"] = os.environ[ENV_TRACEPARENT]
        if os.environ.get(ENV_TRACESTATE):
            carrier["tracestate"] = os.environ[ENV_TRACESTATE]
    if not carrier:
        return None
    return TraceContextTextMapPropagator().extract(carrier)


def _error_text(error: BaseException | str, with_message: bool) -> str:
    if isinstance(error, str):
        return error
    if with_message:
        return f"{type(error).__name__}: {error}"
    return type(error).__name__


def _flag(error: BaseException | str | None) -> str | None:
    return None if error is None else "error"
