"""Built-in callbacks, each usable alone as ``callback_class`` or as a Composite child:

* :class:`Timing` -- the replica startup waterfall (spans and phase histograms);
* :class:`DownloadPolicy` -- what each node downloads (``ctx.worker_node_download_model``);
* :class:`CustomPlacementGroup` -- where the engine runs (``ctx.placement_group``).

Name them by dotted path, e.g. ``"llm_otel_callbacks.builtin.Timing"``.
"""

from .download_policy import CacheCheck, DownloadDecision, DownloadPolicy, DownloadPolicyOptions
from .placement_group import CustomPlacementGroup, PlacementGroupOptions, PlacementGroupTimeoutError
from .timing import Timing, TimingOptions

__all__ = [
    "CacheCheck",
    "CustomPlacementGroup",
    "DownloadDecision",
    "DownloadPolicy",
    "DownloadPolicyOptions",
    "PlacementGroupOptions",
    "PlacementGroupTimeoutError",
    "Timing",
    "TimingOptions",
]

# Request-time built-ins (their hooks run under llm_otel_callbacks.serve.ObservedLLMServer).
from .cost import CostTracker, CostTrackerOptions, Price
from .progress import StreamingProgress, StreamingProgressOptions
from .rate_limit import RateLimiter, RateLimiterOptions, RateLimitExceeded
from .tokens import TokenCounter, TokenCounterOptions

__all__ += [
    "CostTracker",
    "CostTrackerOptions",
    "Price",
    "RateLimitExceeded",
    "RateLimiter",
    "RateLimiterOptions",
    "StreamingProgress",
    "StreamingProgressOptions",
    "TokenCounter",
    "TokenCounterOptions",
]
