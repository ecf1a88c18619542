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

**What the keys assume.** ``api_key`` and ``user`` budget whatever the client sends: this
package does not authenticate anyone. Behind a gateway that authenticates the bearer token (or
sets ``user``), a key is a client. Without one, a client that sends a fresh token (or ``user``)
with each request gets a fresh budget each time. ``known_keys`` closes that: only the listed
keys (SHA-256 hex digests of the bearer tokens, or ``user`` values) get budgets of their own;
every other value shares one ``unlisted`` budget. Budgets are bounded by count (``max_keys``)
and by memory (``max_memory_mib``); the least recently used are forgotten first.
"""

from __future__ import annotations

import asyncio
import re
import time
from bisect import bisect_right
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Unpack

from .. import Count, Number, RayServeLLMCallback
from ..serve import RequestRejected
from ..serve.hook_kwargs import LLMEndKwargs, LLMStartKwargs, RequestKwargs

WINDOW_S = 60.0
_STATE = "rate_limiter.buckets"  # process_cache key (per replica, never pickled)
#: Memory of one budget with its key and map entry, and of one timestamp (or token record) in
#: it, in bytes: measured with tracemalloc on CPython 3.10-3.12, rounded up.
#: tests/test_request_builtins.py checks the bound against tracemalloc.
BUDGET_BYTES = 600
ENTRY_BYTES = 80
UNLISTED = "unlisted"
_API_KEY_DIGEST = re.compile(r"^[0-9a-fA-F]{16,64}$")


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

    model_config = ConfigDict(defer_build=True, extra="forbid")

    requests_per_minute: Count | None = Field(default=None, gt=0)
    tokens_per_minute: Count | None = Field(default=None, gt=0)
    key: Literal["api_key", "user", "global"] = "api_key"
    """What a budget belongs to: the API key (hashed bearer token), the request's ``user``
    field, or everyone together."""
    anonymous: Literal["limit", "exempt"] = "limit"
    """Requests without that key: one shared budget (limit) or no limit (exempt)."""
    known_keys: list[str] | None = None
    """Only these keys get budgets of their own; any other shares one ``unlisted`` budget.
    With ``key: api_key``: SHA-256 hex digests of the bearer tokens (``printf %s "$TOKEN" |
    sha256sum``; the first 16 hex digits are compared); with ``key: user``: the user values."""
    max_keys: Count = Field(default=100_000, gt=0)
    """Budgets kept at most; the least recently used are forgotten beyond that."""
    max_wait_s: Number = Field(default=0.0, ge=0, le=WINDOW_S, allow_inf_nan=False)
    """Seed 004's waiting limiter, bounded: a request over a limit waits for the window to
    free a slot when that takes at most this many seconds (in total), else it is refused.
    0 (the default): refuse at once."""
    max_memory_mib: Number = Field(default=32.0, gt=0, le=65536, allow_inf_nan=False)
    """Memory the budgets may hold (estimated); the least recently used are forgotten beyond."""

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimiterOptions:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("set requests_per_minute, tokens_per_minute, or both")
        if self.known_keys is not None:
            if self.key == "global":
                raise ValueError("known_keys needs key: api_key or key: user")
            if self.key == "api_key":
                bad = [i for i, k in enumerate(self.known_keys) if not _API_KEY_DIGEST.match(k)]
                if bad:  # never echo the entry: it may be the token itself, pasted by mistake
                    raise ValueError(
                        f"known_keys[{bad[0]}]: must be the SHA-256 hex digest of a key "
                        "(16 to 64 hex digits), not the key"
                    )
        return self


class _Bucket:
    """One key's window: sorted timestamps of admitted requests and of finished requests'
    token counts. Plain lists (a deque costs ~600 bytes empty): the window is cut with bisect."""

    __slots__ = ("requests", "token_at", "token_sum", "token_used")

    def __init__(self) -> None:
        self.requests: list[float] = []
        self.token_at: list[float] = []
        self.token_used: list[int] = []
        self.token_sum = 0

    def expire(self, now: float) -> int:
        """Drop what left the window; returns how many entries were dropped."""
        horizon = now - WINDOW_S
        cut = bisect_right(self.requests, horizon)
        if cut:
            del self.requests[:cut]
        cut_tokens = bisect_right(self.token_at, horizon)
        if cut_tokens:
            self.token_sum -= sum(self.token_used[:cut_tokens])
            del self.token_at[:cut_tokens]
            del self.token_used[:cut_tokens]
        return cut + cut_tokens

    @property
    def entries(self) -> int:
        return len(self.requests) + len(self.token_at)


class _Budgets:
    """Every key's bucket, least recently used first, with an estimate of their memory."""

    __slots__ = ("buckets", "entries", "max_bytes", "max_keys")

    def __init__(self, max_keys: int, max_bytes: float) -> None:
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.entries = 0
        self.max_keys = max_keys
        self.max_bytes = max_bytes

    def estimated_bytes(self) -> int:
        return len(self.buckets) * BUDGET_BYTES + self.entries * ENTRY_BYTES

    def get(self, key: str, now: float) -> _Bucket:
        buckets = self.buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket()
        else:
            buckets.move_to_end(key)
            self.entries -= bucket.expire(now)
        return bucket

    def added(self, count: int = 1) -> None:
        self.entries += count
        self._evict()

    def _evict(self) -> None:
        buckets = self.buckets
        while len(buckets) > 1 and (
            len(buckets) > self.max_keys or self.estimated_bytes() > self.max_bytes
        ):
            _, oldest = buckets.popitem(last=False)
            self.entries -= oldest.entries


class RateLimiter(RayServeLLMCallback):
    """Sliding-window request and token limits; refusals are HTTP 429."""

    kwargs_model = RateLimiterOptions

    #: Monotonic clock (seconds); a test may replace it on an instance.
    clock = staticmethod(time.monotonic)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options: RateLimiterOptions = self.options
        known = options.known_keys
        if known is not None and options.key == "api_key":
            known = [k[:16].lower() for k in known]  # the request carries 16 hex digits
        self._known: frozenset[str] | None = None if known is None else frozenset(known)

    def _key(self, kwargs: RequestKwargs) -> str | None:
        options: RateLimiterOptions = self.options
        if options.key == "global":
            return "*"
        value = kwargs.get("api_key_id") if options.key == "api_key" else kwargs.get("user")
        if value:
            known = self._known
            if known is not None:
                # api_key_id is the first 16 hex digits of the token's SHA-256.
                listed = str(value)[:16].lower() if options.key == "api_key" else str(value)
                if listed not in known:
                    return UNLISTED
            return f"{options.key}:{value}"
        return None if options.anonymous == "exempt" else "anonymous"

    def _budgets(self) -> _Budgets:
        budgets: _Budgets | None = self.process_cache.get(_STATE)
        if budgets is None:
            options: RateLimiterOptions = self.options
            budgets = self.process_cache[_STATE] = _Budgets(
                options.max_keys, options.max_memory_mib * 1024 * 1024
            )
        return budgets

    async def on_llm_start(self, prompt: Any, **kwargs: Unpack[LLMStartKwargs]) -> None:
        key = self._key(kwargs)
        if key is None:
            return
        options: RateLimiterOptions = self.options
        deadline: float | None = None
        while True:
            now = self.clock()
            budgets = self._budgets()
            bucket = budgets.get(key, now)
            over = self._over(bucket, now)
            if over is None:
                break
            if deadline is None:
                deadline = now + options.max_wait_s
            wait = over.retry_after_s or 0.0
            if now + wait > deadline:
                raise over
            await asyncio.sleep(max(wait, 0.001))
        if options.requests_per_minute is not None:  # timestamps are kept only for a request limit
            bucket.requests.append(now)
            budgets.added()
        else:
            budgets.added(0)

    def _over(self, bucket: _Bucket, now: float) -> RateLimitExceeded | None:
        options: RateLimiterOptions = self.options
        rpm = options.requests_per_minute
        if rpm is not None and len(bucket.requests) >= rpm:
            # The oldest request in the window leaves it first.
            return RateLimitExceeded("requests", rpm, bucket.requests[0] + WINDOW_S - now)
        tpm = options.tokens_per_minute
        if tpm is not None and bucket.token_sum >= tpm:
            return RateLimitExceeded("tokens", tpm, _tokens_free_after(bucket, tpm, now))
        return None

    async def on_llm_end(self, response: Any, **kwargs: Unpack[LLMEndKwargs]) -> None:
        if self.options.tokens_per_minute is None:
            return
        key = self._key(kwargs)
        if key is None:
            return
        used = int(kwargs.get("prompt_tokens") or 0) + int(kwargs.get("completion_tokens") or 0)
        if used:
            now = self.clock()
            budgets = self._budgets()
            bucket = budgets.get(key, now)
            bucket.token_at.append(now)
            bucket.token_used.append(used)
            bucket.token_sum += used
            budgets.added()


def _tokens_free_after(bucket: _Bucket, limit: int, now: float) -> float:
    """Seconds until enough of the window's tokens expire to be under ``limit`` again."""
    excess = bucket.token_sum - limit + 1
    for at, used in zip(bucket.token_at, bucket.token_used, strict=True):
        excess -= used
        if excess <= 0:
            return at + WINDOW_S - now
    return WINDOW_S
