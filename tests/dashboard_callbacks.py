"""Request-hook children the dashboard test adds to the demo's Composite (Ray workers import
them from the repo root): one fails, one overruns its timeout, so the request-hook outcome
panels have something to show. The requests themselves go on (log policy)."""

from __future__ import annotations

import asyncio
from typing import Any

from llm_otel_callbacks import RayServeLLMCallback


class FailingRequestHook(RayServeLLMCallback):
    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        raise ValueError("request hook failure")


class SlowRequestHook(RayServeLLMCallback):
    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        await asyncio.sleep(float(self.kwargs.get("sleep_s", 0.5)))
