"""The engine's server-sent-event stream items, and the usage the engine reports in them.

A streamed OpenAI response from vLLM is ``"data: {...}\\n\\n"`` strings ending with
``"data: [DONE]\\n\\n"``. This module knows that format: what kind an item is, the usage,
error and last-chunk facts in it, and how to ask the engine for usage chunks (and drop them
again when the client did not ask). It is pure (no Ray, no vLLM, no telemetry), so it is
tested alone.
"""

from __future__ import annotations

import json
import logging
import typing
from typing import Any

from .._request_hooks import ResponseError

logger = logging.getLogger(__name__)

ERROR_PREFIX = 'data: {"error"'
USAGE_ONLY = '"choices":[]'  # the final usage chunk has no choices
PREFIX_LEN = len("data: ")
DONE_ITEM = "data: [DONE]\n\n"

#: What a stream item is (see :func:`kind_of`).
CONTENT, USAGE, ERROR, DONE, OTHER = range(5)


def kind_of(item: str) -> int:
    """What a stream item is, whatever its key order (the slow path)."""
    mark = item[PREFIX_LEN:PREFIX_LEN + 1]
    if mark == "{":
        if USAGE_ONLY in item or '"choices": []' in item:  # compact (vLLM) or spaced JSON
            return USAGE
        if item.startswith(ERROR_PREFIX):
            return ERROR
        return CONTENT
    if mark == "[":
        return DONE
    return OTHER


def read_usage(item: str) -> tuple[int | None, int | None] | None:
    """(prompt tokens, completion tokens) of a usage chunk; None when unreadable."""
    try:
        usage = json.loads(item[PREFIX_LEN:]).get("usage") or {}
        return usage.get("prompt_tokens"), usage.get("completion_tokens")
    except Exception as exc:
        logger.debug("usage chunk not parsed: %s", exc)
        return None


def stream_error(item: str) -> ResponseError:
    """The error an error item carries (message, code, type)."""
    try:
        info = json.loads(item[PREFIX_LEN:])["error"]
        return ResponseError(
            str(info.get("message")), status_code=int(info.get("code") or 500),
            error_type=str(info.get("type") or "StreamError"),
        )
    except Exception:
        return ResponseError("stream error", status_code=500, error_type="StreamError")


def last_chunk_facts(last: str | None) -> tuple[str | None, str | None, list[str]]:
    """Response id, model and finish reasons, from the last content chunk (parsed once)."""
    if last is None:
        return None, None, []
    try:
        data = json.loads(last[PREFIX_LEN:])
        finish = [
            str(c["finish_reason"]) for c in data.get("choices") or []
            if c.get("finish_reason") is not None
        ]
        return data.get("id"), data.get("model"), finish
    except Exception:
        return None, None, []


class ParsedChunk(typing.NamedTuple):
    """One content chunk, read for the stream-chunk hooks."""

    text: str | None
    finish_reason: str | None
    usage: dict[str, Any] | None  # the running usage, when the engine sent it
    item: str  # the chunk to send on (without the usage when it was stripped)


def parse_chunk(item: str, strip_usage: bool) -> ParsedChunk:
    """The text, finish reason and running usage of a content chunk; ``strip_usage`` removes
    the usage the client did not ask for. An unreadable chunk is passed on unchanged."""
    try:
        data = json.loads(item[PREFIX_LEN:])
        choices = data.get("choices") or [{}]
        choice = choices[0]
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        usage = data.get("usage")
        if not isinstance(usage, dict):
            usage = None
        elif strip_usage:
            del data["usage"]
            item = "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            item += "\n\n"
        return ParsedChunk(text, choice.get("finish_reason"), usage, item)
    except Exception as exc:
        logger.debug("chunk not parsed: %s", exc)
        return ParsedChunk(None, None, None, item)


def sse_error(status: int, message: str, error_type: str) -> str:
    """An error item in the engine's format (sent in place of a stream that fails)."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return f"data: {json.dumps(body)}\n\n"


class UsageOptions:
    """Asks the engine for usage in a stream (``stream_options``), per request class."""

    def __init__(self) -> None:
        self._classes: dict[type, Any] = {}

    def ask(self, request: Any, continuous: bool) -> tuple[bool, bool]:
        """Make the engine report usage; returns (drop the usage chunk, strip chunk usage)."""
        options = getattr(request, "stream_options", None)
        client_usage = bool(options is not None and getattr(options, "include_usage", False))
        client_continuous = client_usage and bool(getattr(options, "continuous_usage_stats", False))
        if client_usage and (client_continuous or not continuous):
            return False, False
        cls = self._options_class(request)
        if cls is None:
            return False, False
        try:
            # Built without validation (two bools): the engine's models log and check extra
            # fields in a validator, a few µs per streamed request.
            request.stream_options = cls.model_construct(
                include_usage=True, continuous_usage_stats=continuous or client_continuous
            )
        except Exception as exc:  # never fail the request over telemetry
            logger.debug("stream_options not set: %s", exc)
            return False, False
        return not client_usage, continuous and not client_continuous

    def _options_class(self, request: Any) -> Any:
        cls = type(request)
        if cls not in self._classes:
            found = None
            model_fields = getattr(cls, "model_fields", {})
            field = model_fields.get("stream_options")
            if field is not None:
                for arg in typing.get_args(field.annotation) or (field.annotation,):
                    if isinstance(arg, type) and hasattr(arg, "model_fields"):
                        found = arg
                        break
            self._classes[cls] = found
        return self._classes[cls]
