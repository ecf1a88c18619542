"""Timeouts per hook and the bounded workers of timed sync hooks (no Ray needed)."""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from llm_otel_callbacks import (
    CallbackConfigError,
    Composite,
    HookTimeoutError,
    PoolFullError,
    RayServeLLMCallback,
)
from llm_otel_callbacks._callers import POOL_WORKERS
from llm_otel_callbacks.telemetry import reset_telemetry

DOWNLOAD = "on_before_download_model_files_distributed"
RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    reset_telemetry()
    RELEASE.clear()
    yield
    RELEASE.set()  # let the hung hooks end
    reset_telemetry()


class Hangs(RayServeLLMCallback):
    def on_before_download_model_files_distributed(self) -> None:
        RELEASE.wait(30)

    async def on_before_node_init(self) -> None:
        self.ctx.custom_data["quick"] = True


def _hook_threads() -> int:
    return sum(t.name.startswith("llm-callback-") for t in threading.enumerate())


def test_standalone_callback_timeout_per_hook_and_bounded_workers() -> None:
    cb = Hangs(llm_config=None, ctx_kwargs={}, timeout_s={DOWNLOAD: 0.05})
    threads_before = _hook_threads()
    causes = []
    for _ in range(3 * POOL_WORKERS):
        with pytest.raises(Exception) as info:
            cb.run_callback_sync(DOWNLOAD)
        causes.append(type(info.value.__cause__))
    # The first calls each hold a worker past their timeout; then the pool is full and
    # further calls fail at once as timeouts instead of starting threads.
    assert causes[:POOL_WORKERS] == [HookTimeoutError] * POOL_WORKERS
    assert causes[POOL_WORKERS:] == [PoolFullError] * (2 * POOL_WORKERS)
    assert _hook_threads() - threads_before <= POOL_WORKERS
    # A hook the mapping does not name has no timeout (runs inline, as Ray would).
    asyncio.run(cb.run_callback("on_before_node_init"))
    assert cb.ctx.custom_data["quick"] is True
    # Workers are per process: the callback still pickles.
    assert pickle.loads(pickle.dumps(cb)).timeout_s == {DOWNLOAD: 0.05}


def test_composite_child_timeout_mapping_and_pool_per_child() -> None:
    composite = Composite(
        llm_config=None, ctx_kwargs={},
        callbacks=[{"callback_class": Hangs, "name": "slow", "raise_error_on_callback": False,
                    "timeout_s": {DOWNLOAD: 0.05}}],
    )
    for _ in range(2 * POOL_WORKERS):
        composite.run_callback_sync(DOWNLOAD)  # logged, not raised: the child's policy
    child = composite.children[0]
    assert child.pool.threads == POOL_WORKERS
    assert composite.hook_targets()[0].pool is child.pool


def test_sequential_timed_calls_reuse_one_worker_thread() -> None:
    """A caller that waits for each call never needs a second worker. The race this guards:
    the caller was woken before the worker counted itself idle, so the next call started
    another thread (seen in CI as one extra thread after 20,000 calls)."""
    from llm_otel_callbacks._callers import BoundedPool, call_async, call_sync

    def quick() -> int:
        return 1

    sync_pool, async_pool = BoundedPool(), BoundedPool()
    for _ in range(3000):
        assert call_sync(quick, "h", 5.0, pool=sync_pool) == 1

    async def run() -> None:
        for _ in range(3000):
            assert await call_async(quick, "h", 5.0, pool=async_pool) == 1

    asyncio.run(run())
    assert (sync_pool.threads, async_pool.threads) == (1, 1)


@pytest.mark.parametrize("timeout", [{"on_no_such_hook": 1}, {DOWNLOAD: 0}, {DOWNLOAD: True},
                                     -1, "soon"])
def test_bad_timeouts_are_refused_naming_the_field(timeout: Any) -> None:
    with pytest.raises(CallbackConfigError, match="timeout_s"):
        Hangs(llm_config=None, ctx_kwargs={}, timeout_s=timeout)
    with pytest.raises(CallbackConfigError, match=r"(?s)callbacks\[0\].*timeout_s"):
        Composite(llm_config=None, ctx_kwargs={},
                  callbacks=[{"callback_class": Hangs, "timeout_s": timeout}])


def test_child_of_ours_cannot_set_its_own_timeout_in_kwargs() -> None:
    with pytest.raises(CallbackConfigError, match=r"callback_kwargs\.timeout_s"):
        Composite(llm_config=None, ctx_kwargs={},
                  callbacks=[{"callback_class": Hangs, "callback_kwargs": {"timeout_s": 1}}])


def test_rate_limiter_waits_a_bounded_time_then_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_otel_callbacks.builtin import rate_limit
    from llm_otel_callbacks.builtin.rate_limit import RateLimiter, RateLimitExceeded

    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(rate_limit.asyncio, "sleep", fake_sleep)
    limiter = RateLimiter(llm_config=None, ctx_kwargs={}, requests_per_minute=1,
                          key="global", max_wait_s=5)
    limiter.clock = lambda: now[0]  # type: ignore[method-assign]
    asyncio.run(limiter.on_llm_start("a"))
    now[0] = 56.0
    asyncio.run(limiter.on_llm_start("b"))  # the slot frees in 4 s <= 5 s: waits, admitted
    assert slept == [pytest.approx(4.0)]
    with pytest.raises(RateLimitExceeded):  # 60 s to wait > 5 s: refused at once
        asyncio.run(limiter.on_llm_start("c"))
    assert len(slept) == 1


def test_streaming_progress_on_chunk_and_on_complete() -> None:
    from llm_otel_callbacks.builtin import StreamingProgress

    seen: list[Any] = []
    progress = StreamingProgress(
        llm_config=None, ctx_kwargs={},
        on_chunk=lambda chunk: seen.append(chunk),
        on_complete=lambda: seen.append("done"),
    )
    for text in ("Once", " upon"):
        progress.on_llm_stream_chunk(text, request_id="r1")
    asyncio.run(progress.on_llm_end(None, request_id="r1"))
    assert seen == ["Once", " upon", "done"]


def test_request_hooks_get_the_seed_kwargs_provider_and_user_id() -> None:
    from llm_otel_callbacks.serve.hook_kwargs import start_kwargs

    kwargs = start_kwargs(model="m", request_id="r", trace_id=None, stream=False,
                          operation="chat", user="alice", api_key_id=None, request=None,
                          provider="vllm")
    assert (kwargs["user_id"], kwargs["user"], kwargs["provider"]) == ("alice", "alice", "vllm")


def test_check_fails_for_request_hooks_without_observed_server(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    import yaml

    from llm_otel_callbacks import cli_check

    def check(extra: dict[str, Any]) -> int:
        entry = {"callback_config": {
            "callback_class": "llm_otel_callbacks.Composite",
            "callback_kwargs": {"callbacks": ["llm_otel_callbacks.builtin.TokenCounter",
                                              "llm_otel_callbacks.builtin.Timing"]},
        }, **extra}
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump({"applications": [{"args": {"llm_configs": [entry]}}]}))
        return cli_check.run(argparse.Namespace(config=path))

    assert check({}) == 1
    out = capsys.readouterr().out
    assert "TokenCounter: on_llm_end" in out and "ObservedLLMServer" in out
    assert "Timing" not in out.split("FAIL", 1)[1]  # its engine hooks are telemetry only
    assert check({"server_cls": "llm_otel_callbacks.serve.ObservedLLMServer"}) == 0
