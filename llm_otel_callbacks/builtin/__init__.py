"""Built-in callbacks, each usable alone as ``callback_class`` or as a Composite child:

* :class:`Timing` -- the replica startup waterfall (spans and phase histograms);
* :class:`DownloadPolicy` -- what each node downloads (``ctx.worker_node_download_model``);
* :class:`CustomPlacementGroup` -- where the engine runs (``ctx.placement_group``).

Name them by dotted path, e.g. ``"llm_otel_callbacks.builtin.Timing"``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each built-in is imported on first use: a replica that names one of them does not pay for
# the others' classes and option models at startup (benchmarks/startup_overhead.py).
_WHERE = {
    "CacheCheck": "download_policy", "DownloadDecision": "download_policy",
    "DownloadPolicy": "download_policy", "DownloadPolicyOptions": "download_policy",
    "CustomPlacementGroup": "placement_group", "PlacementGroupOptions": "placement_group",
    "PlacementGroupTimeoutError": "placement_group",
    "Timing": "timing", "TimingOptions": "timing",
    # Request-time built-ins (their hooks run under llm_otel_callbacks.serve.ObservedLLMServer).
    "CostTracker": "cost", "CostTrackerOptions": "cost", "Price": "cost",
    "CostLimiter": "cost_limit", "CostLimiterOptions": "cost_limit",
    "CostLimitExceeded": "cost_limit",
    "StreamingProgress": "progress", "StreamingProgressOptions": "progress",
    "RateLimiter": "rate_limit", "RateLimiterOptions": "rate_limit",
    "RateLimitExceeded": "rate_limit",
    "TokenCounter": "tokens", "TokenCounterOptions": "tokens",
}

__all__ = [
    "CacheCheck",
    "CostLimitExceeded",
    "CostLimiter",
    "CostLimiterOptions",
    "CostTracker",
    "CostTrackerOptions",
    "CustomPlacementGroup",
    "DownloadDecision",
    "DownloadPolicy",
    "DownloadPolicyOptions",
    "PlacementGroupOptions",
    "PlacementGroupTimeoutError",
    "Price",
    "RateLimitExceeded",
    "RateLimiter",
    "RateLimiterOptions",
    "StreamingProgress",
    "StreamingProgressOptions",
    "Timing",
    "TimingOptions",
    "TokenCounter",
    "TokenCounterOptions",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:
    from .cost import CostTracker, CostTrackerOptions, Price
    from .cost_limit import CostLimiter, CostLimiterOptions, CostLimitExceeded
    from .download_policy import (
        CacheCheck,
        DownloadDecision,
        DownloadPolicy,
        DownloadPolicyOptions,
    )
    from .placement_group import (
        CustomPlacementGroup,
        PlacementGroupOptions,
        PlacementGroupTimeoutError,
    )
    from .progress import StreamingProgress, StreamingProgressOptions
    from .rate_limit import RateLimiter, RateLimiterOptions, RateLimitExceeded
    from .timing import Timing, TimingOptions
    from .tokens import TokenCounter, TokenCounterOptions
