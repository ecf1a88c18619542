"""The request hooks' kwargs: each builder returns exactly its TypedDict's keys, so a key added
to a TypedDict without its builder (or the reverse) fails here; and the observer builds them
only through these builders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llm_otel_callbacks.serve import (
    LLMEndKwargs,
    LLMErrorKwargs,
    LLMStartKwargs,
    LLMStreamChunkKwargs,
    RequestKwargs,
)
from llm_otel_callbacks.serve.hook_kwargs import (
    chunk_kwargs,
    end_kwargs,
    error_kwargs,
    start_kwargs,
)

REQUEST = object()


def _start() -> LLMStartKwargs:
    return start_kwargs(model="m", request_id="r1", trace_id="ab" * 16, stream=True,
                        operation="chat", user="u", api_key_id="k", request=REQUEST)


def _keys(typed: Any) -> set[str]:
    return set(typed.__required_keys__) | set(typed.__optional_keys__)


#: Not built by the server: passed on by an earlier callback (share_kwargs; CostTracker's).
SHARED = {"cost"}


def test_start_kwargs_are_exactly_request_kwargs() -> None:
    built = _start()
    assert set(built) == _keys(RequestKwargs) == _keys(LLMStartKwargs)
    assert built["request"] is REQUEST
    assert built["operation"] == "chat"


def test_end_kwargs_extend_the_start_kwargs_with_the_outcome() -> None:
    end = end_kwargs(_start(), prompt_tokens=3, completion_tokens=5, duration_ms=12.5,
                     time_to_first_token_ms=2.0, chunks=4)
    assert set(end) == _keys(LLMEndKwargs) - SHARED
    assert {k: end[k] for k in _keys(RequestKwargs)} == _start()  # type: ignore[literal-required]
    assert (end["total_tokens"], end["token_count"]) == (8, 8)


def test_end_total_is_none_only_when_both_counts_are_unknown() -> None:
    none = end_kwargs(_start(), prompt_tokens=None, completion_tokens=None, duration_ms=1.0,
                      time_to_first_token_ms=None, chunks=None)
    assert none["total_tokens"] is None and none["token_count"] is None
    half = end_kwargs(_start(), prompt_tokens=4, completion_tokens=None, duration_ms=1.0,
                      time_to_first_token_ms=None, chunks=None)
    assert half["total_tokens"] == 4


def test_error_kwargs_add_the_status_code() -> None:
    end = end_kwargs(_start(), prompt_tokens=1, completion_tokens=0, duration_ms=1.0,
                     time_to_first_token_ms=None, chunks=None)
    err = error_kwargs(end, status_code=429)
    assert set(err) | SHARED == _keys(LLMErrorKwargs) == _keys(LLMEndKwargs) | {"status_code"}
    assert err["status_code"] == 429
    assert "status_code" not in end  # the end kwargs are not changed


def test_chunk_kwargs_extend_the_start_kwargs_with_the_chunk() -> None:
    chunk = chunk_kwargs(_start(), index=0, completion_tokens=1, finish_reason=None,
                         raw='data: {"id": "x"}\n\n')
    assert set(chunk) == _keys(LLMStreamChunkKwargs)
    assert chunk["index"] == 0 and chunk["raw"].startswith("data: ")


def test_the_observer_builds_hook_kwargs_only_through_the_builders() -> None:
    source = (Path(__file__).resolve().parents[1] / "llm_otel_callbacks" / "serve"
              / "_requests.py").read_text()
    # A dict literal with a kwargs key is a second place building them.
    for key in _keys(LLMErrorKwargs) | _keys(LLMStreamChunkKwargs):
        assert not re.search(rf'["\']{key}["\']\s*:', source), key
    for builder in ("start_kwargs(", "end_kwargs(", "error_kwargs(", "chunk_kwargs("):
        assert builder in source
