"""CostLimiter: a spending budget per API key, ``user`` or for everyone, per time window.

``callback_kwargs``::

    max_cost: 5.0                 # budget per key and window, in ``currency``
    window_s: 86400               # fixed windows (default a day), aligned to the epoch
    key: api_key                  # api_key (bearer token, hashed) | user | global
    anonymous: limit              # requests without a key: limit (one shared budget) | exempt
    # Where the cost comes from: a CostTracker listed before this callback passes each
    # request's cost on (kwargs["cost"]). Without one, give prices here, as CostTracker's:
    prices: {my-org/llama-3-8b: {input: 0.05, output: 0.25}}
    default_price: {input: 0.1, output: 0.4}
    currency: USD

A key whose spending in the current window has reached ``max_cost`` is refused in
``on_llm_start`` with HTTP 429 (``type`` ``cost``, ``code`` ``cost_limit_exceeded``) and a
``Retry-After`` of the seconds until the next window; it is counted in
``llm_callback_requests_rejected_total{reason="cost"}``. A request's cost is known when it ends,
so the request that crosses the budget completes; the ones after it are refused. Budgets are
per replica (N replicas: up to N times the budget) and bounded to ``max_keys`` keys (least
recently used forgotten first). Keys are what the client sends; see RateLimiter's notes on
authentication.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator
from typing_extensions import Unpack

from .. import CallbackConfigError, Count, Number, RayServeLLMCallback
from ..serve import RequestRejected
from ..serve.hook_kwargs import LLMEndKwargs, LLMStartKwargs, RequestKwargs
from .cost import CostTracker, PriceList, request_cost

logger = logging.getLogger(__name__)

_STATE = "cost_limiter.spent"  # process_cache key (per replica, never pickled)


class CostLimitExceeded(RequestRejected):
    """A request from a key whose budget for the window is spent (HTTP 429)."""

    def __init__(self, max_cost: float, currency: str, window_s: float, retry_after_s: float):
        super().__init__(
            f"Cost limit reached: {max_cost:g} {currency} per {window_s:g}s window. "
            f"Please retry after {max(1, round(retry_after_s))}s.",
            status_code=429,
            reason="cost",
            code="cost_limit_exceeded",
            retry_after_s=retry_after_s,
        )
        self.max_cost = max_cost


class CostLimiterOptions(PriceList):
    """``callback_kwargs`` of :class:`CostLimiter`."""

    max_cost: Number = Field(gt=0, allow_inf_nan=False)
    """Budget per key and window, in ``currency``."""
    window_s: Number = Field(default=86_400, gt=0, allow_inf_nan=False)
    """Length of a budget window in seconds (windows are aligned to the epoch)."""
    key: Literal["api_key", "user", "global"] = "api_key"
    anonymous: Literal["limit", "exempt"] = "limit"
    """Requests without the key: one shared ``anonymous`` budget, or no limit."""
    max_keys: Count = Field(default=100_000, gt=0)
    """Budgets kept at most (least recently used forgotten first)."""

    @model_validator(mode="after")
    def _global_has_no_anonymous(self) -> CostLimiterOptions:
        if self.key == "global" and self.anonymous == "exempt":
            raise ValueError("anonymous='exempt' needs key 'api_key' or 'user'")
        return self


class CostLimiter(RayServeLLMCallback):
    """Refuses requests from a key once its spending in the window reaches ``max_cost``."""

    kwargs_model = CostLimiterOptions

    #: Wall clock (seconds): windows are calendar-aligned. A test may replace it.
    clock = staticmethod(time.time)

    def check_callbacks_before(self, before: Sequence[Any]) -> None:
        options: CostLimiterOptions = self.options
        if options.prices or options.default_price is not None:
            return
        if not any(isinstance(cb, CostTracker) for cb in before):
            raise CallbackConfigError(
                "field 'callback_kwargs.prices': CostLimiter has no way to know what a request "
                "cost: list a CostTracker before it in the Composite's callbacks, or give it "
                "prices / default_price"
            )

    def _key(self, kwargs: RequestKwargs) -> str | None:
        options: CostLimiterOptions = self.options
        if options.key == "global":
            return "*"
        value = kwargs.get("api_key_id") if options.key == "api_key" else kwargs.get("user")
        if value:
            return f"{options.key}:{value}"
        return None if options.anonymous == "exempt" else "anonymous"

    def _spent(self) -> OrderedDict[str, tuple[int, float]]:
        spent: OrderedDict[str, tuple[int, float]] | None = self.process_cache.get(_STATE)
        if spent is None:
            spent = self.process_cache[_STATE] = OrderedDict()
        return spent

    def spent(self, key: str) -> float:
        """What ``key`` (``api_key:<id>``, ``user:<name>``, ``*``, ``anonymous``) spent in the
        current window."""
        window, amount = self._spent().get(key, (-1, 0.0))
        return amount if window == self._window(self.clock()) else 0.0

    def _window(self, now: float) -> int:
        return int(now // float(self.options.window_s))

    async def on_llm_start(self, prompt: Any, **kwargs: Unpack[LLMStartKwargs]) -> None:
        key = self._key(kwargs)
        if key is None:
            return
        options: CostLimiterOptions = self.options
        now = self.clock()
        window, amount = self._spent().get(key, (-1, 0.0))
        if window == self._window(now) and amount >= options.max_cost:
            window_s = float(options.window_s)
            raise CostLimitExceeded(
                float(options.max_cost), options.currency, window_s,
                (window + 1) * window_s - now,
            )

    async def on_llm_end(self, response: Any, **kwargs: Unpack[LLMEndKwargs]) -> None:
        key = self._key(kwargs)
        if key is None:
            return
        cost = kwargs.get("cost")
        if cost is None:
            options: CostLimiterOptions = self.options
            base_model = str(kwargs.get("model") or self.model_id)
            model, price = options.priced_as(
                base_model, getattr(kwargs.get("request"), "model", None)
            )
            if price is None:
                # CostTracker counts and warns about unpriced models; say it here once too.
                warned = self.process_cache.setdefault("cost_limiter.unpriced", set())
                if model not in warned:
                    warned.add(model)
                    logger.warning("CostLimiter: no cost for model '%s': its requests are not "
                                   "counted against any budget", model)
                return
            cost = request_cost(price, kwargs)
        spent = self._spent()
        window = self._window(self.clock())
        last, amount = spent.get(key, (window, 0.0))
        spent[key] = (window, (amount if last == window else 0.0) + float(cost))
        spent.move_to_end(key)
        while len(spent) > self.options.max_keys:
            spent.popitem(last=False)
