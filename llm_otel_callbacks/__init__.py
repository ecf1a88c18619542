"""OpenTelemetry-native observability and a callback SDK for Ray Serve LLM."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names load on first use: ``base`` imports ray.serve.llm (about 2 s), which the
# vLLM plugin (vllm_plugin/, running in vLLM's own processes) and the catalog users never need.
_EXPORTS = {
    "HookTimeoutError": "._callers",
    "PoolFullError": "._callers",
    "InitializeNodeOutput": "._init_output",
    "CallbackConfigError": "._validation",
    "Count": "._validation",
    "Number": "._validation",
    "MetricSpec": ".catalog",
    "Recorder": ".telemetry.metrics",
    "HookTarget": ".base",
    "RayServeLLMCallback": ".base",
    "ChildHookError": ".composite",
    "Composite": ".composite",
    "CompositeCallback": ".composite",
    "validate_callback_config": ".config",
    "TelemetrySettings": ".telemetry",
}

if TYPE_CHECKING:
    from ._callers import HookTimeoutError, PoolFullError
    from ._init_output import InitializeNodeOutput
    from ._validation import CallbackConfigError, Count, Number
    from .base import HookTarget, RayServeLLMCallback
    from .catalog import MetricSpec
    from .composite import ChildHookError, Composite, CompositeCallback
    from .config import validate_callback_config
    from .telemetry import TelemetrySettings
    from .telemetry.metrics import Recorder

__all__ = [
    "CallbackConfigError",
    "ChildHookError",
    "Composite",
    "CompositeCallback",
    "Count",
    "HookTarget",
    "HookTimeoutError",
    "InitializeNodeOutput",
    "MetricSpec",
    "Number",
    "PoolFullError",
    "RayServeLLMCallback",
    "Recorder",
    "TelemetrySettings",
    "__version__",
    "validate_callback_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
