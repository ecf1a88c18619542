"""Process-wide telemetry: settings, providers, metric backends, propagation, export guard."""

from .providers import Telemetry, current_telemetry, get_telemetry, reset_telemetry
from .settings import TelemetrySettings

__all__ = [
    "Telemetry",
    "TelemetrySettings",
    "current_telemetry",
    "get_telemetry",
    "reset_telemetry",
]
