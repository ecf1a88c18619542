"""Builders of the OTel SDK parts our providers use: the resource, the sampler and the span
and metric exporters, from resolved :class:`TelemetrySettings`.

Each is imported lazily from the SDK (an exporter pulls in protobuf or gRPC), and each OTLP/HTTP
exporter gets a one-attempt session (see ``export.OneShotSession``) registered in ``sessions``,
so shutdown can cap every request by one deadline.
"""

from __future__ import annotations

import os
from typing import Any

from .settings import TelemetrySettings

INSTRUMENTATION_NAME = "llm_otel_callbacks"


def resource(settings: TelemetrySettings, process_attrs: dict[str, Any]) -> Any:
    from opentelemetry.sdk.resources import Resource

    attrs: dict[str, Any] = dict(process_attrs)
    attrs.update(settings.resource_attributes)
    attrs["service.name"] = settings.service_name
    attrs["telemetry.distro.name"] = INSTRUMENTATION_NAME
    # Resource(...) and not Resource.create(): settings already merged the OTEL_* variables
    # under the kwargs, and create() would let the environment win.
    return Resource.get_empty().merge(Resource(attrs))


def sampler(settings: TelemetrySettings) -> Any:
    from opentelemetry.sdk.trace import sampling

    arg = 1.0 if settings.sampler_arg is None else settings.sampler_arg
    name = settings.sampler
    if name == "always_on":
        return sampling.ALWAYS_ON
    if name == "always_off":
        return sampling.ALWAYS_OFF
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(arg)
    if name == "parentbased_always_off":
        return sampling.ParentBased(sampling.ALWAYS_OFF)
    if name == "parentbased_traceidratio":
        return sampling.ParentBased(sampling.TraceIdRatioBased(arg))
    return sampling.ParentBased(sampling.ALWAYS_ON)


def _headers(settings: TelemetrySettings) -> dict[str, str]:
    return {k: v.get_secret_value() for k, v in settings.headers.items()}


def _signal_url(base: str, path: str) -> str:
    """OTLP/HTTP: a base endpoint gets the signal path appended (per the exporter spec)."""
    trimmed = base.rstrip("/")
    return trimmed if trimmed.endswith(path) else trimmed + path


def _http_session(settings: TelemetrySettings, sessions: list[Any]) -> Any:
    """A one-attempt session for an SDK OTLP/HTTP exporter (see export.OneShotSession).

    None when a credential-provider session is configured: the exporter loads that one.
    """
    if any(os.environ.get(name) for name in _CREDENTIAL_PROVIDER_VARIABLES):
        return None
    from .export import OneShotSession

    session = OneShotSession(connect_timeout_s=min(1.0, settings.export_timeout_s))
    sessions.append(session)
    return session


_CREDENTIAL_PROVIDER_VARIABLES = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_METRICS_CREDENTIAL_PROVIDER",
)


def _grpc_no_retry() -> Any:
    """``retryable_error_codes`` for the SDK's gRPC exporters: none, so each export is one
    attempt (the SDK otherwise sleeps 1, 2, 4 ... s between attempts on its export thread, up
    to its timeout); our guard backs off and counts drops instead, as for OTLP/HTTP. OK is
    never an error code, so no error is retried."""
    from grpc import StatusCode

    return frozenset({StatusCode.OK})


def span_exporters(
    settings: TelemetrySettings, on_drop: Any, sessions: list[Any],
    on_failed: Any = None,
) -> list[Any]:
    """One guarded exporter per configured sink. Each is built on its own: one that cannot be
    built (an unwritable traces_file) is left out and reported to ``on_failed(sink, error)``;
    the others still export."""
    exporters: list[Any] = []
    for sink, build in (("endpoint", _endpoint_exporter), ("traces_file", _file_exporter)):
        try:
            exporter = build(settings, on_drop, sessions)
        except Exception as exc:
            if on_failed is None:
                raise
            on_failed(sink, exc)
            continue
        if exporter is not None:
            exporters.append(exporter)
    return exporters


def _endpoint_exporter(settings: TelemetrySettings, on_drop: Any, sessions: list[Any]) -> Any:
    from .export import GuardedSpanExporter

    if settings.endpoint:
        if settings.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            session = None
            inner: Any = GrpcSpanExporter(
                endpoint=settings.endpoint,
                headers=_headers(settings) or None,
                timeout=settings.export_timeout_s,
                insecure=settings.endpoint.startswith("http://"),
                retryable_error_codes=_grpc_no_retry(),
            )
        else:
            url = _signal_url(settings.endpoint, "/v1/traces")
            session = _http_session(settings, sessions)
            if session is not None:
                from .otlp_http import LeanOtlpHttpSpanExporter

                inner = LeanOtlpHttpSpanExporter(
                    url, _headers(settings), settings.export_timeout_s, session)
            else:  # a credential-provider session: the SDK's exporter loads and uses it
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter as HttpSpanExporter,
                )

                inner = HttpSpanExporter(
                    endpoint=url,
                    headers=_headers(settings) or None,
                    timeout=settings.export_timeout_s,
                )
        return GuardedSpanExporter(inner, on_drop, session=session)
    return None


def _file_exporter(settings: TelemetrySettings, on_drop: Any, sessions: list[Any]) -> Any:
    from .export import GuardedSpanExporter, OtlpJsonFileSpanExporter

    if not settings.traces_file:
        return None
    file_exporter = OtlpJsonFileSpanExporter(
        settings.traces_file, max_bytes=int(settings.traces_file_max_mib * 1024 * 1024))
    return GuardedSpanExporter(file_exporter, on_drop)


def metric_exporter(settings: TelemetrySettings, sessions: list[Any]) -> Any:
    endpoint = settings.metrics_endpoint or settings.endpoint or ""
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter(
            endpoint=endpoint,
            headers=_headers(settings) or None,
            timeout=settings.export_timeout_s,
            insecure=endpoint.startswith("http://"),
            retryable_error_codes=_grpc_no_retry(),
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    url = _signal_url(endpoint, "/v1/metrics")
    session = _http_session(settings, sessions)
    if session is not None:
        session.bind(url)  # proxies and .netrc once, not per POST
    return HttpMetricExporter(
        endpoint=url,
        headers=_headers(settings) or None,
        timeout=settings.export_timeout_s,
        session=session,
    )
