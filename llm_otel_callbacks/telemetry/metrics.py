"""Metric backends behind one small interface: Ray's metrics system, prometheus_client, OTLP.

* Ray: inside a Ray worker, ``ray.util.metrics`` hands the points to the node's metrics agent,
  which the standard scrape of Ray's metrics export port already collects, so replicas need
  no port of their own. Ray prefixes the names with ``ray_``.
* prometheus_client: outside Ray, a registry (the default one unless given), optionally served
  on a port bound to 127.0.0.1. Histograms carry the trace and span id as an exemplar, which
  the OpenMetrics exposition shows.
* OTLP: when asked for (``otlp_metrics``), through an OTel SDK meter. Histograms carry
  exemplars (trace and span id of the sampled span the measurement belongs to), which OTLP
  carries to backends that keep them.

Ray's metrics carry no exemplars (``ray.util.metrics`` has no way to pass one).

Each recorder caches its per-label-set handle, so a hot call is one dict lookup and one add.
A histogram's ``exemplar`` is the ``SpanContext`` of the span the value belongs to (or None);
it is formatted only by a backend that keeps it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..catalog import MetricSpec

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

logger = logging.getLogger(__name__)

Labels = tuple[str, ...]


class Recorder(Protocol):
    """One metric. ``add`` increments a counter or moves a gauge; ``record`` observes."""

    def add(self, labels: Labels, value: float = 1.0) -> None: ...

    def record(self, labels: Labels, value: float, exemplar: SpanContext | None = None) -> None: ...


class Backend(Protocol):
    name: str

    def recorder(self, spec: MetricSpec) -> Recorder: ...


class _NullRecorder:
    def add(self, labels: Labels, value: float = 1.0) -> None:
        return None

    def record(self, labels: Labels, value: float, exemplar: SpanContext | None = None) -> None:
        return None


NULL_RECORDER: Recorder = _NullRecorder()


def combine(spec: MetricSpec, parts: Sequence[Recorder], pipe: Any = None) -> Recorder:
    """One recorder for ``parts``: through ``pipe`` when given (a
    :class:`~.metric_pipe.MetricPipe`: recorded once, handed to every part by its worker),
    else the one part itself."""
    if not parts:
        return NULL_RECORDER
    if pipe is None:
        if len(parts) > 1:
            raise ValueError("several metric backends need a pipe")
        return parts[0]
    return pipe.recorder(spec, parts)  # type: ignore[no-any-return]


# --- Ray ---------------------------------------------------------------------------------


class _RayRecorder:
    def __init__(self, spec: MetricSpec) -> None:
        from ray.util import metrics as ray_metrics

        self._keys = spec.labels
        self._tags: dict[Labels, dict[str, str]] = {}
        self._gauge_values: dict[Labels, float] = {}
        self._lock = threading.Lock()
        self._metric: Any
        if spec.kind == "counter":
            self._metric = ray_metrics.Counter(
                spec.name, description=spec.description, tag_keys=spec.labels
            )
        elif spec.kind == "histogram":
            self._metric = ray_metrics.Histogram(
                spec.name,
                description=spec.description,
                boundaries=list(spec.buckets or ()),
                tag_keys=spec.labels,
            )
        else:
            self._metric = ray_metrics.Gauge(
                spec.name, description=spec.description, tag_keys=spec.labels
            )
        self._kind = spec.kind
        # Ray's public record re-merges and re-validates the tags on every call (~1.4 µs of
        # ~4.4 µs here); ours are complete, checked str tuples built once per label set, so
        # hand them to the Cython metric it wraps. Public path when that is not there.
        inner: Any = getattr(self._metric, "_metric", None)
        fast = (inner is not None and callable(getattr(inner, "record", None))
                and not getattr(self._metric, "_discard_metric", True)
                and not getattr(self._metric, "_default_tags", None))
        self._record_raw = inner.record if fast else None

    def _tags_for(self, labels: Labels) -> dict[str, str]:
        tags = self._tags.get(labels)
        if tags is None:
            if not all(isinstance(v, str) for v in labels):  # what Ray's public path checks
                raise TypeError(f"metric tag values must be str, got {labels!r}")
            tags = self._tags[labels] = dict(zip(self._keys, labels, strict=True))
        return tags

    def add(self, labels: Labels, value: float = 1.0) -> None:
        if self._kind == "gauge":
            # Ray gauges only know set(); keep the running value per label set.
            with self._lock:
                current = self._gauge_values.get(labels, 0.0) + value
                self._gauge_values[labels] = current
            self._metric.set(current, tags=self._tags_for(labels))
        elif self._record_raw is not None and value > 0:
            self._record_raw(value, tags=self._tags_for(labels))
        else:
            self._metric.inc(value, tags=self._tags_for(labels))

    def record(self, labels: Labels, value: float, exemplar: SpanContext | None = None) -> None:
        if self._record_raw is not None:
            self._record_raw(float(value), tags=self._tags_for(labels))
        else:
            self._metric.observe(value, tags=self._tags_for(labels))


class RayBackend:
    name = "ray"

    def recorder(self, spec: MetricSpec) -> Recorder:
        return _RayRecorder(spec)


# --- prometheus_client -------------------------------------------------------------------

# prometheus_client refuses to register a name twice in one registry, and telemetry can be
# rebuilt in one process (tests, a changed configuration): keep one collector per name.
_PROM_COLLECTORS: dict[tuple[int, str], Any] = {}
_PROM_LOCK = threading.Lock()


class _PromRecorder:
    def __init__(self, spec: MetricSpec, registry: Any) -> None:
        import prometheus_client as pc

        key = (id(registry), spec.name)
        with _PROM_LOCK:
            metric = _PROM_COLLECTORS.get(key)
            if metric is None:
                labels = list(spec.labels)
                if spec.kind == "counter":
                    metric = pc.Counter(spec.name, spec.description, labels, registry=registry)
                elif spec.kind == "histogram":
                    metric = pc.Histogram(
                        spec.name,
                        spec.description,
                        labels,
                        registry=registry,
                        buckets=list(spec.buckets or pc.Histogram.DEFAULT_BUCKETS),
                    )
                else:
                    metric = pc.Gauge(spec.name, spec.description, labels, registry=registry)
                _PROM_COLLECTORS[key] = metric
        self._metric = metric
        self._kind = spec.kind
        self._children: dict[Labels, Any] = {}

    def _child(self, labels: Labels) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child

    def add(self, labels: Labels, value: float = 1.0) -> None:
        self._child(labels).inc(value)

    def record(self, labels: Labels, value: float, exemplar: SpanContext | None = None) -> None:
        if exemplar is not None and exemplar.trace_flags.sampled:
            self._child(labels).observe(value, exemplar=_exemplar_labels(exemplar))
        else:
            self._child(labels).observe(value)


_LAST_EXEMPLAR: tuple[Any, dict[str, str]] = (None, {})


def _exemplar_labels(ctx: SpanContext) -> dict[str, str]:
    """The exemplar labels of ``ctx``; a request records several points with one context, so
    the last one is kept (one tuple, replaced whole: safe across threads)."""
    global _LAST_EXEMPLAR
    last = _LAST_EXEMPLAR
    if last[0] is ctx:
        return last[1]
    labels = {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
    _LAST_EXEMPLAR = (ctx, labels)
    return labels


class PrometheusBackend:
    name = "prometheus"

    def __init__(self, registry: Any = None, port: int | None = None, host: str = "127.0.0.1"):
        import prometheus_client as pc

        self.registry = registry if registry is not None else pc.REGISTRY
        self.port: int | None = None
        if port is not None:
            self.port = _serve(self.registry, port, host)

    def recorder(self, spec: MetricSpec) -> Recorder:
        return _PromRecorder(spec, self.registry)


def _serve(registry: Any, port: int, host: str) -> int:
    import prometheus_client as pc

    server, _thread = pc.start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    logger.info("llm_otel_callbacks: metrics served on http://%s:%d/metrics", host, bound)
    return bound


# --- OTLP (OTel meter) -------------------------------------------------------------------


class _OtelRecorder:
    def __init__(self, spec: MetricSpec, meter: Any) -> None:
        self._keys = spec.otel_labels or spec.labels
        # Semconv metrics (otel_labels set) leave out attributes that are not set (e.g.
        # error.type on success), which Prometheus-style backends show as "".
        self._drop_empty = spec.otel_labels is not None
        self._attrs: dict[Labels, dict[str, str]] = {}
        self._kind = spec.kind
        name = spec.otel_name or spec.name
        if spec.kind == "counter":
            self._inst = meter.create_counter(name, unit=spec.unit, description=spec.description)
        elif spec.kind == "histogram":
            self._inst = meter.create_histogram(
                name,
                unit=spec.unit,
                description=spec.description,
                explicit_bucket_boundaries_advisory=list(spec.buckets or ()),
            )
        else:
            self._inst = meter.create_up_down_counter(
                name, unit=spec.unit, description=spec.description
            )

    def _attributes(self, labels: Labels) -> dict[str, str]:
        attrs = self._attrs.get(labels)
        if attrs is None:
            attrs = dict(zip(self._keys, labels, strict=True))
            if self._drop_empty:
                attrs = {k: v for k, v in attrs.items() if v != ""}
            self._attrs[labels] = attrs
        return attrs

    def add(self, labels: Labels, value: float = 1.0) -> None:
        self._inst.add(value, self._attributes(labels))

    def record(self, labels: Labels, value: float, exemplar: SpanContext | None = None) -> None:
        if exemplar is not None and exemplar.trace_flags.sampled:
            # The SDK's trace-based exemplar filter reads the span from the context.
            from opentelemetry.trace import NonRecordingSpan, set_span_in_context

            context = set_span_in_context(NonRecordingSpan(exemplar))
            self._inst.record(value, self._attributes(labels), context=context)
        else:
            self._inst.record(value, self._attributes(labels))


class OtelBackend:
    name = "otlp"

    def __init__(self, meter: Any) -> None:
        self._meter = meter

    def recorder(self, spec: MetricSpec) -> Recorder:
        return _OtelRecorder(spec, self._meter)
