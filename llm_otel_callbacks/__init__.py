"""OpenTelemetry-native observability and a callback SDK for Ray Serve LLM."""

from __future__ import annotations

__version__ = "0.1.0"

from ._callers import HookTimeoutError
from ._validation import CallbackConfigError
from .base import HookTarget, RayServeLLMCallback
from .composite import ChildHookError, Composite, CompositeCallback
from .config import validate_callback_config
from .telemetry import TelemetrySettings

__all__ = [
    "CallbackConfigError",
    "ChildHookError",
    "Composite",
    "CompositeCallback",
    "HookTarget",
    "HookTimeoutError",
    "RayServeLLMCallback",
    "TelemetrySettings",
    "__version__",
    "validate_callback_config",
]
