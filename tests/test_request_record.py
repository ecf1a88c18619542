"""What the observer reads from a request and a response (serve/_request_record.py), alone:
the on_llm_start prompt per operation, the API key's digest (never the key), sampling span
attributes, and an engine ErrorResponse as a ResponseError."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from llm_otel_callbacks import catalog
from llm_otel_callbacks.serve._request_record import (
    api_key_id,
    prompt_of,
    response_error,
    sampling_attributes,
)


def test_prompt_of_is_messages_prompt_or_input_by_operation():
    request = SimpleNamespace(messages=["m"], prompt="p", input=["i"])
    assert prompt_of("chat", request) == ["m"]
    assert prompt_of("completions", request) == "p"
    assert prompt_of("embeddings", request) == ["i"]


def test_api_key_id_is_a_short_digest_of_the_bearer_token_never_the_key():
    raw = SimpleNamespace(headers={"authorization": "Bearer sk-secret-123"})
    digest = api_key_id(raw)
    assert digest == hashlib.sha256(b"sk-secret-123").hexdigest()[:16]
    assert "sk-secret" not in digest
    assert api_key_id(SimpleNamespace(headers={"Authorization": "sk-secret-123"})) == digest
    assert api_key_id(SimpleNamespace(headers={})) is None
    assert api_key_id(None) is None


def test_sampling_attributes_read_the_stored_values_only_when_set():
    attrs: dict[str, object] = {}
    request = SimpleNamespace(max_tokens=16, temperature=0, top_p=None)
    sampling_attributes(request, attrs)
    assert attrs == {catalog.A_GENAI_MAX_TOKENS: 16, catalog.A_GENAI_TEMPERATURE: 0.0}
    newer: dict[str, object] = {}
    sampling_attributes(SimpleNamespace(max_completion_tokens=8, max_tokens=99, top_p=0.5), newer)
    assert newer == {catalog.A_GENAI_MAX_TOKENS: 8, catalog.A_GENAI_TOP_P: 0.5}


def test_response_error_reads_the_error_and_falls_back():
    item = SimpleNamespace(error=SimpleNamespace(message="too long", code=400,
                                                 type="BadRequestError"))
    error = response_error(item)
    assert (str(error), error.status_code, error.error_type) == (
        "too long", 400, "BadRequestError")
    bare = response_error(SimpleNamespace())
    assert (str(bare), bare.status_code, bare.error_type) == ("error", 500, "ErrorResponse")
