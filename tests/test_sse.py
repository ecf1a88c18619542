"""The engine's stream format read alone (serve/_sse.py): item kinds, usage, errors, the last
chunk's facts, chunk parsing with and without the usage the client did not ask for, and
``stream_options`` set on Ray's real request models."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_otel_callbacks.serve import _sse

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def item(data: Any) -> str:
    return "data: " + json.dumps(data, separators=(",", ":")) + "\n\n"


def test_kind_of_tells_content_usage_error_done_and_other_apart():
    assert _sse.kind_of(item({"id": "x", "choices": [{"delta": {"content": "a"}}]})) == _sse.CONTENT
    assert _sse.kind_of(item({"id": "x", "choices": [], "usage": USAGE})) == _sse.USAGE
    spaced = "data: " + json.dumps({"choices": [], "usage": USAGE}) + "\n\n"
    assert _sse.kind_of(spaced) == _sse.USAGE
    assert _sse.kind_of(item({"error": {"message": "m", "code": 400}})) == _sse.ERROR
    assert _sse.kind_of(_sse.DONE_ITEM) == _sse.DONE
    assert _sse.kind_of(": keep-alive\n\n") == _sse.OTHER


def test_read_usage_gives_prompt_and_completion_tokens_or_none_when_unreadable():
    assert _sse.read_usage(item({"choices": [], "usage": USAGE})) == (3, 2)
    assert _sse.read_usage(item({"choices": []})) == (None, None)
    assert _sse.read_usage("data: {not json\n\n") is None


def test_stream_error_reads_message_code_and_type_and_has_a_fallback():
    error = _sse.stream_error(item({"error": {"message": "too long", "code": 400,
                                              "type": "BadRequestError"}}))
    assert (str(error), error.status_code, error.error_type) == (
        "too long", 400, "BadRequestError")
    broken = _sse.stream_error("data: {oops\n\n")
    assert (broken.status_code, broken.error_type) == (500, "StreamError")


def test_last_chunk_facts_are_id_model_and_finish_reasons():
    last = item({"id": "r1", "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop"}, {"index": 1, "finish_reason": None}]})
    assert _sse.last_chunk_facts(last) == ("r1", "m", ["stop"])
    assert _sse.last_chunk_facts(None) == (None, None, [])
    assert _sse.last_chunk_facts("data: {bad\n\n") == (None, None, [])


def test_parse_chunk_reads_chat_and_completion_text_and_strips_usage_only_when_asked():
    chat = item({"id": "x", "choices": [{"delta": {"content": "hi"}, "finish_reason": None}],
                 "usage": USAGE})
    kept = _sse.parse_chunk(chat, strip_usage=False)
    assert (kept.text, kept.finish_reason, kept.usage, kept.item) == ("hi", None, USAGE, chat)
    stripped = _sse.parse_chunk(chat, strip_usage=True)
    assert stripped.usage == USAGE
    assert json.loads(stripped.item[len("data: "):]) == {
        "id": "x", "choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}
    assert stripped.item.endswith("\n\n")
    completion = item({"choices": [{"text": "yo", "finish_reason": "length"}]})
    assert _sse.parse_chunk(completion, strip_usage=True) == ("yo", "length", None, completion)


def test_an_unreadable_chunk_is_passed_on_unchanged():
    assert _sse.parse_chunk("data: {half\n\n", strip_usage=True) == (
        None, None, None, "data: {half\n\n")


def test_sse_error_is_an_error_item_kind_of_recognises():
    error = _sse.sse_error(500, "boom", "InternalServerError")
    assert _sse.kind_of(error) == _sse.ERROR
    assert _sse.stream_error(error).status_code == 500


@pytest.fixture(scope="module")
def models() -> Any:
    from ray.llm._internal.serve.core.configs import openai_api_models

    return openai_api_models


def chat(models: Any, **options: Any) -> Any:
    return models.ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, **options)


def test_usage_options_asks_the_engine_for_usage_and_says_what_to_drop(models: Any):
    usage = _sse.UsageOptions()
    request = chat(models)
    assert usage.ask(request, continuous=False) == (True, False)
    assert request.stream_options.include_usage is True
    assert not request.stream_options.continuous_usage_stats
    running = chat(models)
    assert usage.ask(running, continuous=True) == (True, True)
    assert running.stream_options.continuous_usage_stats is True


def test_usage_options_keeps_what_the_client_asked_for(models: Any):
    usage = _sse.UsageOptions()
    asked = chat(models, stream_options={"include_usage": True})
    assert usage.ask(asked, continuous=False) == (False, False)
    both = chat(models, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert usage.ask(both, continuous=True) == (False, False)
    final_only = chat(models, stream_options={"include_usage": True})
    assert usage.ask(final_only, continuous=True) == (False, True)  # strip the running usage


def test_usage_options_leaves_a_request_without_stream_options_alone():
    class Plain:
        stream = True

    assert _sse.UsageOptions().ask(Plain(), continuous=True) == (False, False)
