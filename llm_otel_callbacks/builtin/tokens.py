"""TokenCounter: prompt and completion tokens of every request, from the engine's usage.

In the replica it keeps running totals (the seed API: ``prompt_tokens``, ``completion_tokens``,
``total_tokens``, ``request_count``) and counts ``llm_callback_tokens_total`` by model and token
type. It implements only ``on_llm_end``, so it costs nothing per streamed chunk.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from typing_extensions import Unpack

from .. import RayServeLLMCallback, catalog
from ..serve.hook_kwargs import LLMEndKwargs


class TokenCounterOptions(BaseModel):
    """``callback_kwargs`` of :class:`TokenCounter` (none yet)."""

    model_config = ConfigDict(defer_build=True, extra="forbid")


class TokenCounter(RayServeLLMCallback):
    """Counts tokens per replica (attributes) and cluster-wide (metric)."""

    kwargs_model = TokenCounterOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.request_count = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def snapshot(self) -> dict[str, int]:
        """The totals of this replica so far."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "request_count": self.request_count,
        }

    async def on_llm_end(self, response: Any, **kwargs: Unpack[LLMEndKwargs]) -> None:
        prompt = int(kwargs.get("prompt_tokens") or 0)
        completion = int(kwargs.get("completion_tokens") or 0)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.request_count += 1
        counter = self.metric(catalog.TOKENS)
        model = str(kwargs.get("model") or self.model_id)
        if prompt:
            counter.add((model, catalog.TOKEN_TYPE_INPUT), float(prompt))
        if completion:
            counter.add((model, catalog.TOKEN_TYPE_OUTPUT), float(completion))
