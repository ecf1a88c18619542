"""Process-wide telemetry, built lazily on first use and never pickled.

Only the first ``set_tracer_provider`` in a process counts, and Ray Serve tracing, vLLM and the
user may all want that slot. So: an SDK provider somebody already installed is reused as is;
otherwise we build a private one (installed globally only on request), so we never take the
slot from a component that starts after us.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, Tracer

from .. import catalog
from ..catalog import MetricSpec
from . import factories
from .factories import INSTRUMENTATION_NAME
from .metrics import (
    Backend,
    OtelBackend,
    PrometheusBackend,
    RayBackend,
    Recorder,
    combine,
)
from .settings import TelemetrySettings

logger = logging.getLogger(__name__)

SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"


class Telemetry:
    """The tracer and metric recorders of this process."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self._recorders: dict[str, Recorder] = {}
        self._lock = threading.Lock()
        self._shutdown_hooks: list[Any] = []
        # The OTLP/HTTP sessions we built: shutdown sets their deadline.
        self._sessions: list[Any] = []
        self.span_processors: list[Any] = []
        self.process_attributes: dict[str, Any] = _process_attributes()
        self.tracer_provider: Any = None
        self.backends: list[Backend] = []
        self.prometheus_port: int | None = None
        # Set when metrics go to two backends (local + OTLP): recorded once, fanned out.
        self.metric_pipe: Any = None
        #: (signal, sink) of every sink that could not be set up; the others still work.
        self.failed_sinks: list[tuple[str, str]] = []
        if not settings.enabled:
            self.tracer: Tracer = NoOpTracer()
            return
        self.tracer = self._make_tracer()
        self.backends = self._make_backends()
        atexit.register(self.shutdown)
        for signal, _ in self.failed_sinks:  # counted once the backends exist
            self.recorder(catalog.EXPORT_FAILURES).add((signal, catalog.REASON_SINK_FAILED))

    def _sink_failed(self, signal: str, sink: str, error: BaseException) -> None:
        """One exporter or backend could not be set up: it alone is left out, and said once."""
        self.failed_sinks.append((signal, sink))
        logger.warning("llm_otel_callbacks: %s sink '%s' disabled, the others still work: "
                       "%s: %s", signal, sink, type(error).__name__, error)

    # --- traces ---------------------------------------------------------------------------

    def _make_tracer(self) -> Tracer:
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

        from .lean_spans import LeanTracer, OwnTracerProvider

        settings = self.settings
        installed = trace.get_tracer_provider()
        if settings.reuse_installed_provider and isinstance(installed, SdkTracerProvider):
            self.tracer_provider = installed
            _warn_sinks_unused(settings)
            tracer = installed.get_tracer(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)
            if isinstance(installed, OwnTracerProvider) and not isinstance(tracer, NoOpTracer):
                return LeanTracer(installed, tracer)  # ours, installed by another Telemetry
            return tracer
        if not settings.exports_traces:
            # Nothing would receive the spans: do not pay for recording them.
            return NoOpTracer()
        from opentelemetry.sdk.trace import SpanLimits

        from .export import SpanQueueProcessor

        limits = SpanLimits()  # from the OTEL_*_LIMIT variables, as the SDK reads them
        provider = OwnTracerProvider(
            sampler=factories.sampler(settings),
            resource=factories.resource(settings, self.process_attributes),
            shutdown_on_exit=False,  # we flush at exit ourselves, with a bound
            span_limits=limits,
        )

        exporters = factories.span_exporters(
            settings, self._count_dropped, self._sessions,
            on_failed=lambda sink, exc: self._sink_failed("traces", sink, exc),
        )
        for exporter in exporters:
            processor = SpanQueueProcessor(
                exporter,
                on_drop=self._count_dropped,
                schedule_delay_s=settings.schedule_delay_ms / 1000.0,
                shutdown_timeout_s=settings.shutdown_timeout_s,
            )
            self.span_processors.append(processor)
            provider.add_span_processor(processor)
        self.tracer_provider = provider
        self._shutdown_hooks.append(provider)
        if settings.install_global_provider:
            trace.set_tracer_provider(provider)
        sdk_tracer = provider.get_tracer(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)
        if isinstance(sdk_tracer, NoOpTracer):  # OTEL_SDK_DISABLED
            return sdk_tracer
        return LeanTracer(provider, sdk_tracer)

    def _count_dropped(self, count: int, reason: str) -> None:
        self.recorder(catalog.EXPORT_FAILURES).add(("traces", reason), float(count))

    # --- metrics --------------------------------------------------------------------------

    def _make_backends(self) -> list[Backend]:
        settings = self.settings
        backends: list[Backend] = []
        choice = settings.metrics_backend
        if choice == "auto":
            choice = "ray" if _in_ray() else "prometheus"
        # Each backend on its own: a taken prometheus_port must not silence OTLP or Ray.
        try:
            if choice == "ray":
                backends.append(RayBackend())
            elif choice == "prometheus":
                prom = PrometheusBackend(port=settings.prometheus_port,
                                         host=settings.prometheus_host)
                self.prometheus_port = prom.port
                backends.append(prom)
        except Exception as exc:
            self._sink_failed("metrics", choice, exc)
        if settings.exports_otlp_metrics:
            try:
                meter = self._make_meter()
                if meter is not None:
                    backends.append(OtelBackend(meter))
            except Exception as exc:
                self._sink_failed("metrics", "otlp", exc)
        # Two backends: record once, fan out. Ray's metrics alone go through the pipe too:
        # Ray's record releases the GIL, which costs a busy replica loop (metric_pipe.py).
        if len(backends) > 1 or any(b.name == RayBackend.name for b in backends):
            from .metric_pipe import MetricPipe

            self.metric_pipe = MetricPipe()
        return backends

    def _make_meter(self) -> Any:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

        settings = self.settings
        installed = otel_metrics.get_meter_provider()
        if settings.reuse_installed_provider and isinstance(installed, SdkMeterProvider):
            return installed.get_meter(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = factories.metric_exporter(settings, self._sessions)
        reader = PeriodicExportingMetricReader(
            exporter,
            export_interval_millis=settings.metric_export_interval_ms,
            export_timeout_millis=settings.export_timeout_s * 1000,
        )
        provider = SdkMeterProvider(
            metric_readers=[reader],
            resource=factories.resource(settings, self.process_attributes),
            shutdown_on_exit=False,
        )
        self._shutdown_hooks.append(provider)
        if settings.install_global_provider:
            otel_metrics.set_meter_provider(provider)
        return provider.get_meter(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)

    def recorder(self, spec: MetricSpec) -> Recorder:
        """The recorder for one catalog metric, created on first use."""
        rec = self._recorders.get(spec.name)
        if rec is not None:
            return rec
        with self._lock:
            rec = self._recorders.get(spec.name)
            if rec is None:
                parts = []
                for backend in self.backends:
                    try:
                        parts.append(backend.recorder(spec))
                    except Exception as exc:  # a broken backend must not break hooks
                        logger.warning(
                            "llm_otel_callbacks: metric %s unavailable on %s: %s",
                            spec.name, backend.name, exc,
                        )
                rec = combine(spec, parts, self.metric_pipe)
                self._recorders[spec.name] = rec
        return rec

    # --- lifecycle ------------------------------------------------------------------------

    def force_flush(self, timeout_s: float | None = None) -> None:
        """Flush spans and metrics, waiting at most ``timeout_s`` in total."""
        timeout = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        pipe = self.metric_pipe

        def flush_all() -> None:
            if pipe is not None:
                pipe.flush()  # pending measurements first, so the meter exports them
            for provider in self._flushables():
                _flush(provider, timeout)

        _bounded(flush_all, timeout)

    def _flushables(self) -> list[Any]:
        out = list(self._shutdown_hooks)
        if self.tracer_provider is not None and self.tracer_provider not in out:
            out.append(self.tracer_provider)
        return out

    def shutdown(self) -> None:
        """Flush and stop what we built (never a provider we reused).

        Returns within ``shutdown_timeout_s`` in all, whatever the collector does: each
        provider is flushed and stopped in its own daemon thread (at once: a hanging span
        export must not keep the metric reader running), all waited for until one deadline,
        and every OTLP request made meanwhile is capped by that deadline too.
        """
        timeout = self.settings.shutdown_timeout_s
        deadline = time.monotonic() + timeout
        for fn in list(_BEFORE_SHUTDOWN):
            try:
                fn()
            except Exception as exc:
                logger.debug("telemetry pre-shutdown hook failed: %s", exc)
        for session in self._sessions:
            session.deadline = deadline
        if self.metric_pipe is not None:
            _bounded(self.metric_pipe.shutdown, _left(deadline))
        hooks, self._shutdown_hooks = self._shutdown_hooks, []
        reused = self.tracer_provider if self.tracer_provider not in hooks else None

        jobs: list[Any] = [lambda h=hook: (_flush(h, _left(deadline)), h.shutdown())
                           for hook in hooks]
        if reused is not None:
            # A reused provider is not ours to shut down, but our spans should leave.
            jobs.append(lambda: _flush(reused, _left(deadline)))
        workers = [_start(job) for job in jobs]
        for worker in workers:
            worker.join(_left(deadline))


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _flush(provider: Any, timeout_s: float) -> Any:
    flush = getattr(provider, "force_flush", None)
    return flush(int(timeout_s * 1000)) if flush is not None else None


def _bounded(fn: Any, timeout_s: float) -> None:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s`` for it."""
    _start(fn).join(timeout_s)


def _start(fn: Any) -> threading.Thread:
    worker = threading.Thread(target=_quiet(fn), name="llm-otel-flush", daemon=True)
    worker.start()
    return worker


def _quiet(fn: Any) -> Any:
    def run() -> None:
        try:
            fn()
        except Exception as exc:
            logger.debug("telemetry flush failed: %s", exc)

    return run


_BEFORE_SHUTDOWN: list[Any] = []


def before_shutdown(fn: Any) -> Any:
    """Register ``fn`` to run before telemetry flushes at exit (to end open spans)."""
    _BEFORE_SHUTDOWN.append(fn)
    return fn


# --- process-wide registry ------------------------------------------------------------------

# One Telemetry per process and configuration: Ray reuses task workers across deployments,
# so a worker may serve download hooks of callbacks that export to different places.
_STATES: dict[str, Telemetry] = {}
_STATE_LOCK = threading.Lock()
_STATE_PID: int | None = None


def _key(settings: TelemetrySettings) -> str:
    data = settings.model_dump()
    data["headers"] = {k: v.get_secret_value() for k, v in settings.headers.items()}
    return json.dumps(data, sort_keys=True, default=str)


def get_telemetry(settings: TelemetrySettings) -> Telemetry:
    """This process's telemetry for ``settings``, built on first use."""
    global _STATE_PID
    key = _key(settings)
    if os.getpid() == _STATE_PID:
        state = _STATES.get(key)
        if state is not None:
            return state
    with _STATE_LOCK:
        if os.getpid() != _STATE_PID:  # a forked child must not reuse its parent's threads
            _STATES.clear()
            _STATE_PID = os.getpid()
        state = _STATES.get(key)
        if state is None:
            try:
                state = Telemetry(settings)
            except Exception as exc:
                # Telemetry must never stop a replica from starting.
                logger.warning("llm_otel_callbacks: telemetry disabled: %s", exc)
                state = Telemetry(settings.model_copy(update={"enabled": False}))
            _STATES[key] = state
        return state


def current_telemetry() -> Telemetry | None:
    """The telemetry built first in this process, if any."""
    if os.getpid() != _STATE_PID:
        return None
    return next(iter(_STATES.values()), None)


def reset_telemetry() -> None:
    """Shut this process's telemetry down so the next hook builds it anew (tests, reconfig)."""
    global _STATE_PID
    with _STATE_LOCK:
        states = list(_STATES.values()) if os.getpid() == _STATE_PID else []
        _STATES.clear()
        _STATE_PID = None
    for state in states:
        state.shutdown()


# --- helpers -------------------------------------------------------------------------------


def _version() -> str:
    from .. import __version__

    return __version__


def _in_ray() -> bool:
    try:
        import ray

        return bool(ray.is_initialized())
    except Exception:
        return False


def _process_attributes() -> dict[str, Any]:
    """Where spans come from: host, pid, and Ray / Serve ids when present."""
    attrs: dict[str, Any] = {"host.name": socket.gethostname(), "process.pid": os.getpid()}
    if not _in_ray():
        return attrs
    try:
        import ray

        rc = ray.get_runtime_context()
        attrs[catalog.R_RAY_NODE] = rc.get_node_id()
        attrs[catalog.R_RAY_JOB] = rc.get_job_id()
        actor = rc.get_actor_id()
        if actor:
            attrs[catalog.R_RAY_ACTOR] = actor
    except Exception:
        pass
    from .._ray import replica_info

    replica = replica_info()
    if replica is not None:
        attrs[catalog.R_SERVE_APP] = replica.app_name
        attrs[catalog.R_SERVE_DEPLOYMENT] = replica.deployment
        attrs[catalog.R_SERVE_REPLICA] = replica.replica_id
    return attrs


_WARNED_INSTALLED: set[tuple[str | None, str | None]] = set()


def _warn_sinks_unused(settings: TelemetrySettings) -> None:
    """Spans go through the installed provider's own processors: our endpoint and traces_file
    (and our bounded queue) are not used for them. Said once per configuration."""
    key = (settings.endpoint, settings.traces_file)
    if not (settings.endpoint or settings.traces_file) or key in _WARNED_INSTALLED:
        return
    _WARNED_INSTALLED.add(key)
    unused = " and ".join(
        name for name, value in (("endpoint", settings.endpoint),
                                 ("traces_file", settings.traces_file)) if value
    )
    logger.warning(
        "llm_otel_callbacks: a tracer provider is already installed (Ray Serve tracing, vLLM "
        "or the application); spans go to its exporters, and the configured %s is not used "
        "for them (nor our bounded export queue). Set reuse_installed_provider: false to "
        "export spans there instead.", unused,
    )
