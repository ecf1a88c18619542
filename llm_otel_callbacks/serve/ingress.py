"""ObservedOpenAiIngress: Ray's OpenAI ingress, answering refused requests the way OpenAI does.

A request hook's rejection (e.g. :class:`~llm_otel_callbacks.builtin.RateLimiter`) reaches the
ingress as the engine's error response with HTTP code 429, a raise-policy hook failure as one
with 500. Ray's own ingress turns such a response into a JSON error with that status but no
headers, its own wrapped message, and for a 500 only "Internal Server Error"; this one answers
with the OpenAI-style body the server chose and, for a rejection, a ``Retry-After`` header::

    build_openai_app({
        "llm_configs": [llm_config],
        "ingress_cls_config": {"ingress_cls": "llm_otel_callbacks.serve.ObservedOpenAiIngress"},
    })

Everything else is Ray's ``OpenAiIngress`` unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from ray.serve.llm.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from starlette.responses import JSONResponse, Response

from .._ray import openai_ingress_class
from ._requests import RESPONSE_FIELD

logger = logging.getLogger(__name__)

OpenAiIngress: Any
OpenAiIngress, _HAS_RESPONSE_HOOK = openai_ingress_class()
if not _HAS_RESPONSE_HOOK:
    logger.warning("llm_otel_callbacks: this Ray's OpenAiIngress has no _get_response; "
                   "ObservedOpenAiIngress answers rejections as Ray's ingress does")


class _Refusal(Exception):
    def __init__(self, status_code: int, body: dict[str, Any], retry_after_s: float | None):
        super().__init__(status_code)
        self.status_code = status_code
        self.body = body
        self.retry_after_s = retry_after_s

    def response(self) -> Response:
        headers = {}
        if self.retry_after_s is not None:
            # Retry-After takes whole seconds; round up so a client never retries too early.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(content=self.body, status_code=self.status_code, headers=headers)


def _refusal_in(item: Any) -> _Refusal | None:
    first = item[0] if isinstance(item, list) and item else item
    info = getattr(first, "error", None)
    extra = getattr(info, "model_extra", None) or {}
    body = extra.get(RESPONSE_FIELD)
    if not isinstance(body, dict):
        return None
    retry = extra.get("retry_after_s")
    return _Refusal(int(getattr(info, "code", 429)), body,
                    float(retry) if retry is not None else None)


class ObservedOpenAiIngress(OpenAiIngress):  # type: ignore[misc,valid-type]
    """``OpenAiIngress`` plus proper answers (status, body, ``Retry-After``) to rejections."""

    async def _get_response(self, **kwargs: Any) -> AsyncGenerator[Any, None]:
        # Ray's private generator every endpoint's engine results pass through (_ray.py).
        first = True
        async for item in super()._get_response(**kwargs):
            if first:
                first = False
                refusal = _refusal_in(item)
                if refusal is not None:
                    raise refusal
            yield item

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        try:
            response: Response = await super().completions(body, request)
        except _Refusal as refusal:
            return refusal.response()
        return response

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        try:
            response: Response = await super().chat(body, request)
        except _Refusal as refusal:
            return refusal.response()
        return response

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        try:
            response: Response = await super().embeddings(body, request)
        except _Refusal as refusal:
            return refusal.response()
        return response
