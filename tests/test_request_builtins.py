"""Request built-ins under hostile input: rotating keys, many keys, unconfigured models."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import tracemalloc

import pytest

from llm_otel_callbacks import CallbackConfigError
from llm_otel_callbacks.builtin import RateLimiter
from llm_otel_callbacks.builtin.rate_limit import RateLimitExceeded


def _key_id(token: str) -> str:
    """What the replica passes as ``api_key_id`` for a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def test_rate_limiter_budgets_stay_within_their_memory_bound() -> None:
    """100,000 distinct keys held 185 MB. Now a memory bound (default 32 MiB; 4 MiB here to
    keep the test short) forgets the least recently used budgets: measured with tracemalloc."""
    assert RateLimiter(requests_per_minute=1).options.max_memory_mib == 32
    rl = RateLimiter(requests_per_minute=5, tokens_per_minute=1000, key="api_key",
                     max_memory_mib=4)
    now = [0.0]
    rl.clock = lambda: now[0]

    async def flood() -> None:
        for i in range(30_000):
            now[0] += 1e-4  # distinct timestamps, as a real clock gives
            key = f"{i:016x}"
            await rl.on_llm_start("p", api_key_id=key)
            await rl.on_llm_end(None, api_key_id=key, prompt_tokens=300, completion_tokens=400)

    assert rl.process_cache is not None  # built before measuring
    gc.collect()
    tracemalloc.start()
    try:
        asyncio.run(flood())
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held <= 4 * 1024 * 1024, f"{held / 2**20:.1f} MiB"
    kept = len(rl.process_cache["rate_limiter.buckets"].buckets)
    assert 1000 < kept < 30_000, kept  # bounded by memory, not by max_keys (100,000)


def test_rate_limiter_known_keys_rotating_tokens_share_one_budget() -> None:
    good = "sk-the-real-client"
    rl = RateLimiter(requests_per_minute=2, key="api_key",
                     known_keys=[hashlib.sha256(good.encode()).hexdigest()])
    rl.clock = lambda: 100.0

    async def start(token: str) -> None:
        await rl.on_llm_start("p", api_key_id=_key_id(token))

    asyncio.run(start("rotated-1"))
    asyncio.run(start("rotated-2"))
    with pytest.raises(RateLimitExceeded):  # a third fresh token gets no fresh budget
        asyncio.run(start("rotated-3"))
    asyncio.run(start(good))  # the listed key has its own budget
    asyncio.run(start(good))
    with pytest.raises(RateLimitExceeded):
        asyncio.run(start(good))


def test_rate_limiter_known_users_and_refusals() -> None:
    rl = RateLimiter(requests_per_minute=1, key="user", known_keys=["alice-with-a-long-name"])
    rl.clock = lambda: 5.0

    async def start(user: str) -> None:
        await rl.on_llm_start("p", user=user)

    asyncio.run(start("alice-with-a-long-name"))
    asyncio.run(start("mallory-1"))
    with pytest.raises(RateLimitExceeded):
        asyncio.run(start("mallory-2"))
    secret = "sk-live-pasted-by-mistake"
    with pytest.raises(CallbackConfigError, match=r"known_keys\[0\]") as info:
        RateLimiter(requests_per_minute=1, key="api_key", known_keys=[secret])
    assert secret not in str(info.value)
    with pytest.raises(CallbackConfigError, match="known_keys"):
        RateLimiter(requests_per_minute=1, key="global", known_keys=["a" * 64])




class _Request:
    def __init__(self, model: str) -> None:
        self.model = model


def test_cost_tracker_labels_only_configured_models() -> None:
    """With default_price, the request's model (client input) used to become a label value
    and a costs_by_model key: 300 invented names made 300 series."""
    from llm_otel_callbacks.builtin import CostTracker
    from tests._support.ray_env import scrape

    tracker = CostTracker(
        prices={"lora-a": {"input": 1.0, "output": 2.0}, "base": {"input": 3.0, "output": 4.0}},
        default_price={"input": 10.0, "output": 10.0},
        telemetry={"metrics_backend": "prometheus", "prometheus_port": 0, "endpoint": None},
    )

    async def end(requested: str | None) -> None:
        await tracker.on_llm_end(None, model="base", request=_Request(requested or ""),
                                 prompt_tokens=1_000_000, completion_tokens=0)

    for i in range(300):
        asyncio.run(end(f"invented-{i}"))
    for requested in ("lora-a", "base", None):
        asyncio.run(end(requested))
    assert set(tracker.costs_by_model) == {"other", "lora-a", "base"}
    assert tracker.costs_by_model["other"] == pytest.approx(300 * 10.0)
    assert tracker.costs_by_model["base"] == pytest.approx(2 * 3.0)  # "base" and no model
    port = tracker._observer.tel.prometheus_port
    samples = scrape(f"http://127.0.0.1:{port}/metrics")["llm_callback_cost_total"]
    models = {labels["model"] for labels, _ in samples}  # the registry is per process
    assert {"other", "lora-a", "base"} <= models
    assert not [m for m in models if m.startswith("invented-")], models
