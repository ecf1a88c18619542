"""RateLimiter: requests and tokens per minute, per API key or per ``user`` field.

``callback_kwargs``::

    requests_per_minute: 60        # at least one of the two limits
    tokens_per_minute: 100000      # prompt + completion tokens of finished requests
    key: api_key                   # api_key (bearer token, hashed) | user (the request's
                                   # "user" field) | global (one budget for everyone)
    anonymous: limit               # requests without a key: limit (one shared budget) | exempt

A request over a limit is refused in ``on_llm_start`` with HTTP 429, an OpenAI-style body
(``type`` is ``requests`` or ``tokens``, ``code`` is ``rate_limit_exceeded``) and, with
:class:`~llm_otel_callbacks.serve.ObservedOpenAiIngress`, a ``Retry-After`` header; it is counted
in ``llm_callback_requests_rejected_total{reason}``. Refused requests do not use up the budget.

Windows slide over the last 60 s. The token limit refuses a request once the tokens of the
requests that finished in the window reach the limit (a request's size is known only when it
ends). Limits hold per replica: with N replicas a key can get up to N times the limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._request_hooks import RequestRejected
from .._validation import Count
from ..base import RayServeLLMCallback

WINDOW_S = 60.0
_STATE = "rate_limiter.buckets"  # process_cache key (per replica, never pickled)


class RateLimitExceeded(RequestRejected):
    """A request over a RateLimiter limit (HTTP 429)."""

    def __init__(self, kind: Literal["requests", "tokens"], limit: int, retry_after_s: float):
        super().__init__(
            f"Rate limit reached: {limit} {kind} per minute. "
            f"Please retry after {max(1, round(retry_after_s))}s.",
            status_code=429,
            reason=kind,
            code="rate_limit_exceeded",
            retry_after_s=retry_after_s,
        )
        self.kind = kind
        self.limit = limit


class RateLimiterOptions(BaseModel):
    """``callback_kwargs`` of :class:`RateLimiter`."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: Count | None = Field(default=None, gt=0)
    tokens_per_minute: Count | None = Field(default=None, gt=0)
    key: Literal["api_key", "user", "global"] = "api_key"
    """What a budget belongs to: the API key (hashed bearer token), the request's ``user``
    field, or everyone together."""
    anonymous: Literal["limit", "exempt"] = "limit"
    """Requests without that key: one shared budget (limit) or no limit (exempt)."""
    max_keys: Count = Field(default=100_000, gt=0)
    """Budgets kept at most; the least recently used are forgotten beyond that."""

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimiterOptions:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("set requests_per_minute, tokens_per_minute, or both")
        return self


class _Bucket:
    __slots__ = ("requests", "token_sum", "tokens")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0

    def expire(self, now: float) -> None:
        horizon = now - WINDOW_S
        requests = self.requests
        while requests and requests[0] <= horizon:
            requests.popleft()
        tokens = self.tokens
        while tokens and tokens[0][0] <= horizon:
            self.token_sum -= tokens.popleft()[1]


class RateLimiter(RayServeLLMCallback):
    """Sliding-window request and token limits; refusals are HTTP 429."""

    kwargs_model = RateLimiterOptions

    #: Monotonic clock (seconds); a test may replace it on an instance.
    clock = staticmethod(time.monotonic)

    def _key(self, kwargs: dict[str, Any]) -> str | None:
        options: RateLimiterOptions = self.options
        if options.key == "global":
            return "*"
        value = kwargs.get("api_key_id") if options.key == "api_key" else kwargs.get("user")
        if value:
            return f"{options.key}:{value}"
        return None if options.anonymous == "exempt" else "anonymous"

    def _bucket(self, key: str) -> _Bucket:
        buckets: OrderedDict[str, _Bucket] = self.process_cache.setdefault(_STATE, OrderedDict())
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket()
            if len(buckets) > self.options.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket

    async def on_llm_start(self, prompt: Any, **kwargs: Any) -> None:
        key = self._key(kwargs)
        if key is None:
            return
        options: RateLimiterOptions = self.options
        now = self.clock()
        bucket = self._bucket(key)
        bucket.expire(now)
        rpm = options.requests_per_minute
        if rpm is not None and len(bucket.requests) >= rpm:
            # The oldest request in the window leaves it first.
            raise RateLimitExceeded("requests", rpm, bucket.requests[0] + WINDOW_S - now)
        tpm = options.tokens_per_minute
        if tpm is not None and bucket.token_sum >= tpm:
            raise RateLimitExceeded("tokens", tpm, _tokens_free_after(bucket, tpm, now))
        bucket.requests.append(now)

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        if self.options.tokens_per_minute is None:
            return
        key = self._key(kwargs)
        if key is None:
            return
        used = int(kwargs.get("prompt_tokens") or 0) + int(kwargs.get("completion_tokens") or 0)
        if used:
            bucket = self._bucket(key)
            bucket.tokens.append((self.clock(), used))
            bucket.token_sum += used


def _tokens_free_after(bucket: _Bucket, limit: int, now: float) -> float:
    """Seconds until enough of the window's tokens expire to be under ``limit`` again."""
    excess = bucket.token_sum - limit + 1
    for at, used in bucket.tokens:
        excess -= used
        if excess <= 0:
            return at + WINDOW_S - now
    return WINDOW_S
