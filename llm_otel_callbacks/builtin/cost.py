"""CostTracker: what each request cost, from per-model prices per million tokens.

``callback_kwargs``::

    prices:                       # per model id: price per million input / output tokens
      my-org/llama-3-8b: {input: 0.05, output: 0.25}
    default_price: {input: 0.1, output: 0.4}   # optional: models not listed
    currency: USD

The model looked up is the request's ``model`` when ``prices`` lists it (a LoRA adapter can
have its own price), then the deployment's model id. With ``default_price``, a requested model
that is neither is priced at it and recorded as ``other``: the request's ``model`` is client
input, so only configured models become label values and keys (bounded cardinality). Totals are kept
per replica (``total_cost``, ``costs_by_model``) and counted in
``llm_callback_cost_total{model, currency}``; each request span gets ``llm_callback.cost``, and
the callbacks after this one get it as ``kwargs["cost"]`` in their ``on_llm_end``. A
request with no price is counted in ``llm_callback_cost_unpriced_requests_total`` (and logged
once per model).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Unpack

from .. import Number, RayServeLLMCallback, catalog
from ..serve import share_kwargs
from ..serve.hook_kwargs import LLMEndKwargs

logger = logging.getLogger(__name__)

#: Label (and ``costs_by_model`` key) of requested models that are not configured.
OTHER_MODEL = "other"


class Price(BaseModel):
    """Price per million tokens."""

    model_config = ConfigDict(defer_build=True, extra="forbid")

    input: Number = Field(ge=0, allow_inf_nan=False)
    output: Number = Field(ge=0, allow_inf_nan=False)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What a request of these token counts costs at this price."""
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


class PriceList(BaseModel):
    """Per-model prices (CostTracker, and CostLimiter when it prices requests itself)."""

    model_config = ConfigDict(defer_build=True, extra="forbid")

    prices: dict[str, Price] = Field(default_factory=dict)
    """Model id -> price per million input/output tokens."""
    default_price: Price | None = None
    """Price of models not in ``prices`` (None: such requests are not priced)."""
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    """ISO 4217 code; a metric label."""

    def priced_as(self, base_model: str, requested: Any) -> tuple[str, Price | None]:
        """(label, price) of a request: a configured model name (or ``other``) and its price.
        ``requested``: the request's ``model`` (client input), ``base_model``: the
        deployment's."""
        if requested:
            requested = str(requested)
            if requested in self.prices:
                return requested, self.prices[requested]
            if requested != base_model and self.default_price is not None:
                return OTHER_MODEL, self.default_price
        return base_model, self.price_of(base_model)

    def price_of(self, model: str) -> Price | None:
        """The price of ``model``: its own, else ``default_price`` (None: unpriced)."""
        return self.prices.get(model) or self.default_price


def request_cost(price: Price, kwargs: Mapping[str, Any]) -> float:
    """What one finished request cost at ``price`` (its ``on_llm_end`` kwargs' tokens)."""
    return price.cost(int(kwargs.get("prompt_tokens") or 0),
                      int(kwargs.get("completion_tokens") or 0))


class CostTrackerOptions(PriceList):
    """``callback_kwargs`` of :class:`CostTracker`."""


class CostTracker(RayServeLLMCallback):
    """Prices every finished request; totals per replica and as a metric."""

    kwargs_model = CostTrackerOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.total_cost = 0.0
        self.total_tokens = 0
        self.request_count = 0
        self.costs_by_model: dict[str, float] = {}
        self._unpriced_warned: set[str] = set()

    def price_of(self, model: str) -> Price | None:
        options: CostTrackerOptions = self.options
        return options.price_of(model)

    def cost_of(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Cost of one request, or None when the model has no price."""
        price = self.price_of(model)
        return None if price is None else price.cost(prompt_tokens, completion_tokens)

    async def on_llm_end(self, response: Any, **kwargs: Unpack[LLMEndKwargs]) -> None:
        base_model = str(kwargs.get("model") or self.model_id)
        options: CostTrackerOptions = self.options
        model, price = options.priced_as(base_model, getattr(kwargs.get("request"), "model", None))
        prompt = int(kwargs.get("prompt_tokens") or 0)
        completion = int(kwargs.get("completion_tokens") or 0)
        cost = None if price is None else price.cost(prompt, completion)
        if cost is None:
            self.metric(catalog.COST_UNPRICED).add((model,))
            if model not in self._unpriced_warned:
                self._unpriced_warned.add(model)
                logger.warning("CostTracker: no price for model '%s' (and no default_price)",
                               model)
            return
        currency = self.options.currency
        self.total_cost += cost
        self.total_tokens += prompt + completion
        self.request_count += 1
        self.costs_by_model[model] = self.costs_by_model.get(model, 0.0) + cost
        self.metric(catalog.COST).add((model, currency), cost)
        share_kwargs(cost=cost)  # the seed's kwargs["cost"], for the callbacks after this one
        span = trace.get_current_span()  # the request span while a request hook runs
        if span.is_recording():
            span.set_attribute(catalog.A_COST, cost)
            span.set_attribute(catalog.A_CURRENCY, currency)
