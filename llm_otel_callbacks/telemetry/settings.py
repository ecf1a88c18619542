"""One pydantic model for telemetry: ``callback_kwargs["telemetry"]`` > ``OTEL_*`` > defaults."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .._validation import CallbackConfigError, Count, Number, validate_kwargs

Protocol = Literal["grpc", "http/protobuf"]
MetricsBackend = Literal["auto", "ray", "prometheus", "none"]
SamplerName = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]

DEFAULT_SERVICE_NAME = "ray-serve-llm"

_forced_off: list[bool] = []  # a stack: nested blocks restore what was before


@contextlib.contextmanager
def telemetry_forced_off() -> Iterator[None]:
    """Within the block, every settings resolved in this process (any thread) have
    ``enabled: false``, whatever the kwargs or ``OTEL_*`` say: ``check`` constructs callbacks
    but must export nothing, write no file and open no port."""
    _forced_off.append(True)
    try:
        yield
    finally:
        _forced_off.pop()


class TelemetrySettings(BaseModel):
    """How this process exports spans and metrics. Plain data: safe to pickle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """False turns every span and metric of this package off (``OTEL_SDK_DISABLED=true``)."""
    service_name: str = Field(default=DEFAULT_SERVICE_NAME, min_length=1)
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    endpoint: str | None = None
    """OTLP endpoint for traces (and metrics unless ``metrics_endpoint`` is set)."""
    metrics_endpoint: str | None = None
    protocol: Protocol = "http/protobuf"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    """OTLP headers; kept as secrets so they never show in a repr or a log."""
    traces_file: str | None = None
    """Embedded sink: write spans as OTLP/JSON lines to this file (no collector needed).
    Resolved to an absolute path when configured (not against a worker's current folder);
    created 0600, never through a symlink."""
    traces_file_max_mib: Number = Field(default=256.0, gt=0, le=1024 * 1024, allow_inf_nan=False)
    """Size cap of ``traces_file``: once a batch would pass it, spans are dropped and counted
    (``reason="export_failed"``), not written; nothing is rotated or deleted."""
    sampler: SamplerName = "parentbased_always_on"
    sampler_arg: Number | None = Field(default=None, ge=0, le=1)
    """Probability for the ``traceidratio`` samplers, in [0, 1]."""
    metrics_backend: MetricsBackend = "auto"
    """auto: Ray's metrics system inside a Ray worker, else a prometheus_client registry."""
    prometheus_port: Count | None = Field(default=None, ge=0, le=65535)
    """Outside Ray: serve the prometheus_client registry on this port (0 = pick a free one)."""
    prometheus_host: str = "127.0.0.1"
    otlp_metrics: bool = False
    """Export metrics over OTLP too (``OTEL_METRICS_EXPORTER=otlp``). Off by default: each
    measurement then goes to exactly one backend (Ray's metrics or prometheus_client). When on,
    a measurement is still recorded once and fanned out to both at export (metric_pipe)."""
    # Upper bounds: an hour. Larger values (and inf) overflow the SDK's thread waits, which
    # would fail in a background thread at run time instead of here.
    metric_export_interval_ms: Count = Field(default=10_000, ge=100, le=3_600_000)
    export_timeout_s: Number = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    schedule_delay_ms: Count = Field(default=5_000, ge=10, le=3_600_000)
    """Span export interval (``OTEL_BSP_SCHEDULE_DELAY``); 5 s is the OTel SDK's default. An
    export costs a replica a fixed ~0.5 ms of CPU besides its spans, which at tens of requests
    a second was a large share of the request path's cost; a full batch goes out at once."""
    shutdown_timeout_s: Number = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False)
    reuse_installed_provider: bool = True
    """Use a tracer/meter provider somebody already installed (Ray Serve, vLLM, the user)."""
    install_global_provider: bool = False
    """Make the provider we build the process-wide one (off: never take the slot from others)."""
    record_exception_messages: bool = True
    """Put exception messages on spans, span statuses and log lines; turn off when hooks may
    raise with secrets in them (then only the error's type is recorded)."""
    client_error_messages: bool = False
    """Send a failing request hook's exception message to the HTTP client. Off (default): the
    client sees which callback and hook failed and the error's type, never its message."""

    @field_validator("endpoint", "metrics_endpoint")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # A URL's user:password would show in every repr, dump and log line of the settings;
        # the message never quotes the URL.
        if value is not None:
            try:
                parts = urlsplit(value)
            except ValueError:
                raise ValueError("is not a URL") from None
            if parts.username is not None or parts.password is not None:
                raise ValueError(
                    "credentials in the URL (user:password@) are refused: they would show in "
                    "logs; put them in 'headers' (OTEL_EXPORTER_OTLP_HEADERS), kept secret"
                )
        return value

    @field_validator("traces_file")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must be a file path")
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("headers", mode="before")
    @classmethod
    def _parse_headers(cls, value: Any) -> Any:
        return _parse_kv(value, secret=True) if isinstance(value, str) else value

    @field_validator("resource_attributes", mode="before")
    @classmethod
    def _parse_resource(cls, value: Any) -> Any:
        return _parse_kv(value) if isinstance(value, str) else value

    @property
    def exports_traces(self) -> bool:
        return self.enabled and bool(self.endpoint or self.traces_file)

    @property
    def exports_otlp_metrics(self) -> bool:
        if not self.enabled:
            return False
        return self.otlp_metrics and bool(self.metrics_endpoint or self.endpoint)

    @classmethod
    def resolve(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TelemetrySettings:
        """Build settings from the kwargs mapping over ``OTEL_*`` variables over defaults.

        Raises :class:`CallbackConfigError` naming the offending field.
        """
        try:
            merged: dict[str, Any] = from_environment(os.environ if environ is None else environ)
        except _EnvError as exc:
            raise CallbackConfigError(f"telemetry: {exc}") from None
        if overrides is not None:
            if not isinstance(overrides, Mapping):
                raise CallbackConfigError(
                    f"telemetry: expected a mapping, got {type(overrides).__name__}"
                )
            merged.update(overrides)
        settings = validate_kwargs(cls, merged, "telemetry")
        if _forced_off:
            settings = settings.model_copy(update={"enabled": False})
        return settings


def from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The standard OTEL_* variables, mapped onto settings fields."""
    out: dict[str, Any] = {}
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        out["enabled"] = False
    if env.get("OTEL_SERVICE_NAME"):
        out["service_name"] = env["OTEL_SERVICE_NAME"]
    if env.get("OTEL_RESOURCE_ATTRIBUTES"):
        try:
            attrs = _parse_kv(env["OTEL_RESOURCE_ATTRIBUTES"])
        except ValueError as exc:
            raise _EnvError(
                f"environment variable OTEL_RESOURCE_ATTRIBUTES: {exc} "
                "(field 'resource_attributes')"
            ) from None
        # The spec lets service.name come from the resource attributes too.
        if "service.name" in attrs and "service_name" not in out:
            out["service_name"] = attrs["service.name"]
        out["resource_attributes"] = attrs
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint:
        out["endpoint"] = endpoint
    if env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        out["metrics_endpoint"] = env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"]
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if protocol:
        out["protocol"] = protocol.strip()
    headers = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get(
        "OTEL_EXPORTER_OTLP_HEADERS"
    )
    if headers:
        out["headers"] = headers
    if env.get("OTEL_TRACES_SAMPLER"):
        out["sampler"] = env["OTEL_TRACES_SAMPLER"].strip().lower()
    if env.get("OTEL_TRACES_SAMPLER_ARG"):
        out["sampler_arg"] = env["OTEL_TRACES_SAMPLER_ARG"]
    if env.get("OTEL_EXPORTER_OTLP_TIMEOUT"):
        # The spec gives this one in milliseconds.
        raw = env["OTEL_EXPORTER_OTLP_TIMEOUT"]
        try:
            out["export_timeout_s"] = float(raw) / 1000.0
        except ValueError:
            raise _EnvError(
                f"environment variable OTEL_EXPORTER_OTLP_TIMEOUT={raw!r} is not a number of "
                "milliseconds (field 'export_timeout_s')"
            ) from None
    if env.get("OTEL_BSP_SCHEDULE_DELAY"):
        out["schedule_delay_ms"] = env["OTEL_BSP_SCHEDULE_DELAY"]
    if env.get("OTEL_METRIC_EXPORT_INTERVAL"):
        out["metric_export_interval_ms"] = env["OTEL_METRIC_EXPORT_INTERVAL"]
    exporters = {e.strip() for e in env.get("OTEL_METRICS_EXPORTER", "").lower().split(",")}
    if "otlp" in exporters:
        out["otlp_metrics"] = True
    elif "none" in exporters:
        out["otlp_metrics"] = False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        out["endpoint"] = None
    return out


class _EnvError(ValueError):
    """An ``OTEL_*`` variable that cannot be read; the message names it (never its value
    when it may be a secret)."""


def _parse_kv(text: str, secret: bool = False) -> dict[str, str]:
    """Parse the ``k1=v1,k2=v2`` form the OTel spec uses for headers and resources.

    With ``secret`` (headers) an error never quotes the text: a malformed
    ``Authorization`` item would be the token itself."""
    out: dict[str, str] = {}
    for index, item in enumerate(text.split(",")):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            shown = f"item {index + 1}" if secret else repr(key.strip())
            raise ValueError(f"expected key=value, got {shown}")
        out[unquote(key.strip())] = unquote(value.strip())
    return out
