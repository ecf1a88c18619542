"""OpenTelemetry-native observability and a callback SDK for Ray Serve LLM."""

from __future__ import annotations

__version__ = "0.1.0"

from ._callers import HookTimeoutError
from ._validation import CallbackConfigError
from .base import RayServeLLMCallback
from .telemetry import TelemetrySettings

__all__ = [
    "CallbackConfigError",
    "HookTimeoutError",
    "RayServeLLMCallback",
    "TelemetrySettings",
    "__version__",
]
